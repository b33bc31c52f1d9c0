"""User metadata files (JSONL, CSV) and folder scans."""

from __future__ import annotations

import json
import os
import uuid

import fsspec
import numpy as np
import pytest
import soundfile as sf

from musiclora.data.metadata import TrackMeta, load_metadata, scan_folder, title_from_filename


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_resolves_relative_paths_and_keeps_extras(tmp_path):
    (tmp_path / "meta").mkdir()
    meta = write_jsonl(
        tmp_path / "meta" / "tracks.jsonl",
        [
            {"path": "audio/a.wav", "caption": "solo piano, slow", "bpm": "72", "artist": "Ann"},
            {"path": "/abs/b.flac", "caption": "drum and bass", "genre": "dnb", "key": "F minor"},
            {"path": "s3://bucket/c.ogg", "caption": "field recording", "mood": "calm"},
            {"path": "../up/d.wav", "caption": "choir"},
        ],
    )
    tracks = load_metadata(meta)

    assert [t.path for t in tracks] == [
        str(tmp_path / "meta" / "audio" / "a.wav"),
        "/abs/b.flac",
        "s3://bucket/c.ogg",
        str(tmp_path / "up" / "d.wav"),
    ]
    assert tracks[0].bpm == 72.0 and tracks[0].model_extra == {"artist": "Ann"}
    assert (tracks[1].genre, tracks[1].key) == ("dnb", "F minor")
    assert tracks[2].mood == "calm" and tracks[2].bpm is None


def test_relative_paths_resolve_from_the_file_not_the_cwd(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "m.jsonl", [{"path": "x.wav", "caption": "c"}])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_metadata("../m.jsonl")[0].path == str(tmp_path / "x.wav")


def test_csv_with_optional_columns(tmp_path):
    meta = tmp_path / "tracks.csv"
    meta.write_text(
        "path,caption,genre,bpm,key,mood\n"
        'a.wav,"upbeat funk, slap bass",funk,110,E minor,happy\n'
        "\n"
        "b.wav,ambient pads,,,,\n",
        encoding="utf-8",
    )
    a, b = load_metadata(meta)
    assert a.caption == "upbeat funk, slap bass" and a.bpm == 110.0 and a.key == "E minor"
    assert a.path == str(tmp_path / "a.wav")
    assert (b.genre, b.bpm, b.key, b.mood) == (None, None, None, None)


def test_csv_with_bom_and_crlf(tmp_path):
    meta = tmp_path / "tracks.csv"
    meta.write_bytes(b"\xef\xbb\xbfpath,caption\r\nsong.wav,bossa nova guitar\r\n")
    (track,) = load_metadata(meta)
    assert track.caption == "bossa nova guitar" and track.path.endswith("song.wav")


def test_csv_missing_required_column_names_file_and_column(tmp_path):
    meta = tmp_path / "no_caption.csv"
    meta.write_text("path,genre\na.wav,jazz\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no_caption\.csv.*'caption'"):
        load_metadata(meta)


def test_jsonl_missing_field_names_file_and_line(tmp_path):
    meta = write_jsonl(tmp_path / "t.jsonl", [{"path": "a.wav", "caption": "x"}, {"caption": "no path"}])
    with pytest.raises(ValueError, match=r"t\.jsonl: line 2 has no 'path'"):
        load_metadata(meta)


def test_empty_caption_is_missing(tmp_path):
    meta = tmp_path / "t.csv"
    meta.write_text("path,caption\na.wav,   \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"t\.csv: line 2 .*'caption'"):
        load_metadata(meta)


def test_non_utf8_names_file_and_line(tmp_path):
    meta = tmp_path / "latin1.csv"
    meta.write_bytes("path,caption\na.wav,ok\nb.wav,chanson française\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.csv: line 3 is not valid UTF-8"):
        load_metadata(meta)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ('{"path": "a.wav", "caption": "x"}\n{not json}\n', r"line 2 is not valid JSON"),
        ('["a.wav", "x"]\n', r"line 1 is a JSON list"),
        ('{"path": "a.wav", "caption": "x", "bpm": -5}\n', r"line 1: bpm"),
        ('{"path": "a.wav", "caption": "x", "bpm": "fast"}\n', r"line 1: bpm"),
        ("\n\n", r"holds no tracks"),
    ],
)
def test_bad_jsonl(tmp_path, text, pattern):
    meta = tmp_path / "bad.jsonl"
    meta.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=pattern) as info:
        load_metadata(meta)
    assert "bad.jsonl" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_metadata(tmp_path / "absent.jsonl")


def test_unknown_suffix_is_sniffed(tmp_path):
    (tmp_path / "a.txt").write_text('{"path": "a.wav", "caption": "x"}\n', encoding="utf-8")
    (tmp_path / "b.txt").write_text("path,caption\nb.wav,y\n", encoding="utf-8")
    assert load_metadata(tmp_path / "a.txt")[0].caption == "x"
    assert load_metadata(tmp_path / "b.txt")[0].caption == "y"


def test_fsspec_url_resolves_relative_to_the_url():
    root = f"memory://musiclora-test-{uuid.uuid4().hex}"
    with fsspec.open(f"{root}/meta/tracks.jsonl", "w") as f:
        f.write(json.dumps({"path": "songs/a.wav", "caption": "harp"}) + "\n")
    (track,) = load_metadata(f"{root}/meta/tracks.jsonl")
    assert track.path == f"{root}/meta/songs/a.wav"


def test_track_meta_validation():
    assert TrackMeta(path="a.wav", caption=" x ").caption == "x"
    with pytest.raises(ValueError):
        TrackMeta(path="a.wav", caption="")


# --------------------------------------------------------------------------- folders


def _touch_wav(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(160, dtype=np.float32), 16000)


def test_scan_folder_captions_from_names(tmp_path):
    _touch_wav(tmp_path / "the_king_is_dead.wav")
    _touch_wav(tmp_path / "jazz" / "cool" / "take-five.WAV")
    (tmp_path / "notes.txt").write_text("not audio")
    tracks = scan_folder(tmp_path)
    assert [t.path for t in tracks] == [
        str(tmp_path / "jazz" / "cool" / "take-five.WAV"),
        str(tmp_path / "the_king_is_dead.wav"),
    ]
    assert [t.caption for t in tracks] == ["Take Five, jazz, cool", "The King Is Dead"]
    assert all(os.path.isabs(t.path) for t in tracks)


def test_scan_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no audio files"):
        scan_folder(tmp_path)
    (tmp_path / "f.wav").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        scan_folder(tmp_path / "f.wav")


def test_title_from_filename():
    assert title_from_filename("/x/01-intro_theme.ogg") == "01 Intro Theme"
    assert title_from_filename("s3://b/Battle Music.flac") == "Battle Music"
