"""What `prepare` reads: lenient metadata and folders, caption analysis (key, tempo), album.json
tracks, and scores rendered to audio (MIDI All-Notes-Off, the time-bounded FluidSynth render)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from musiclora.data.analysis import (
    analyse_audio,
    describe_music,
    estimate_key,
    normalize_key,
    retune_caption,
    transpose_key,
)
from musiclora.data.metadata import load_tracks

SR = 22_050
needs_fluidsynth = pytest.mark.skipif(shutil.which("fluidsynth") is None, reason="needs fluidsynth (scripts/setup.sh)")


def notes(midis: list[int], seconds_each: float, sr: int = SR) -> np.ndarray:
    """Piano-like notes (harmonics, decay), one after another."""
    t = np.arange(int(seconds_each * sr)) / sr
    out = []
    for m in midis:
        f = 440 * 2 ** ((m - 69) / 12)
        out.append(sum(0.3 / h * np.sin(2 * np.pi * f * h * t) for h in (1, 2, 3, 4)) * np.exp(-2 * t))
    return np.concatenate(out).astype(np.float32)


# --------------------------------------------------------------------------- analysis


@pytest.mark.parametrize(
    ("tonic", "mode", "expected"),
    [(60, "major", "C major"), (57, "minor", "A minor"), (67, "major", "G major"), (62, "minor", "D minor")],
)
def test_key_of_a_cadence(tonic, mode, expected):
    third = 4 if mode == "major" else 3
    chords = [(0, third, 7), (5, 9 if mode == "major" else 8, 12), (7, 11, 14), (0, third, 7)]  # I IV V I
    x = sum(notes([tonic + c[i] for c in chords] * 3, 0.5) for i in range(3))
    found = analyse_audio(np.tile(x, 2), SR)
    assert found.key == expected and found.key_strength > 0.6


def test_tempo_of_a_click_track():
    sr, bpm = SR, 128
    x = np.zeros(int(30 * sr), np.float32)
    click = notes([84], 0.05, sr)
    for beat in np.arange(0, 30, 60 / bpm):
        i = int(beat * sr)
        x[i : i + len(click)] += click[: len(x) - i]
    assert analyse_audio(x, sr).bpm == pytest.approx(bpm, abs=2)


def test_analysis_refuses_short_or_silent_audio():
    with pytest.raises(ValueError, match="too short"):
        analyse_audio(np.ones(SR, np.float32), SR)
    with pytest.raises(ValueError, match="silent"):
        analyse_audio(np.zeros(20 * SR, np.float32), SR)
    with pytest.raises(ValueError, match="all zero"):
        estimate_key(np.zeros(12))


def test_key_spelling_and_caption_words():
    assert normalize_key("a minor") == "A minor" and normalize_key("B- major") == "Bb major"
    assert normalize_key("Db major") == "C# major" and transpose_key("A minor", 3) == "C minor"
    assert transpose_key("C major", -1) == "B major"
    with pytest.raises(ValueError, match="'<tonic> major'"):
        normalize_key("H dur")
    assert describe_music("e minor", "3/4", 72.0, "string quartet") == "string quartet, in E minor, 3/4 time, 72 BPM"
    assert describe_music() == ""
    caption = "chorale; church organ, in G minor, 4/4 time, 72 BPM; played in G minor mood"
    assert retune_caption(caption, "G minor", 72.0, 2, 1.1) == (
        "chorale; church organ, in A minor, 4/4 time, 79.2 BPM; played in A minor mood"
    )


# --------------------------------------------------------------------------- lenient inputs


def test_load_tracks_skips_bad_rows_and_names_them(tmp_path):
    meta = tmp_path / "tracks.csv"
    meta.write_bytes(
        b"path,caption,bpm\na.wav,fine,120\nb.wav,,90\nc.wav,caf\xe9,80\nd.wav,ok,-1\n"
    )
    tracks, skipped = load_tracks(meta)
    assert [t.path for t in tracks] == [str(tmp_path / "a.wav")]
    reasons = {s["path"].rsplit("/", 1)[1]: s["reason"] for s in skipped}
    assert set(reasons) == {"b.wav", "c.wav", "d.wav"}
    assert "line 3 has no 'caption'" in reasons["b.wav"] and "line 4 is not valid UTF-8" in reasons["c.wav"]
    assert "line 5: bpm" in reasons["d.wav"] and all("tracks.csv" in r for r in reasons.values())


def test_a_folder_is_scanned_or_read_through_its_metadata_file(tmp_path):
    (tmp_path / "jazz").mkdir()
    sf.write(tmp_path / "jazz" / "take_five.wav", np.zeros(100, np.float32), 8000)
    (tmp_path / "cover.png").write_bytes(b"\x89PNG")
    tracks, skipped = load_tracks(tmp_path)
    assert [t.caption for t in tracks] == ["Take Five, jazz"]
    assert skipped == [{"path": str(tmp_path / "cover.png"), "reason": skipped[0]["reason"]}]
    assert "not an audio file" in skipped[0]["reason"]
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"path": "jazz/take_five.wav", "caption": "cool jazz"}))
    tracks, skipped = load_tracks(tmp_path)
    assert [t.caption for t in tracks] == ["cool jazz"] and skipped == []


# --------------------------------------------------------------------------- album.json (warzone2100-music)


def test_album_json_gives_title_author_bpm_and_licence(tmp_path):
    from musiclora.data.corpus import describe_track
    from musiclora.data.debian import PackageInfo

    album = tmp_path / "albums" / "legacy"
    album.mkdir(parents=True)
    x = notes([60, 64, 67, 72] * 6, 0.5)
    sf.write(album / "track4.opus", np.stack([x, x], 1), 48000, format="OGG", subtype="OPUS")
    (album / "album.json").write_text(json.dumps({
        "title": "Legacy Soundtrack", "author": "LupusMechanicus",
        "tracks": [{"filename": "track4.opus", "title": "Uncertain Future", "author": "LupusMechanicus", "bpm": 80}],
    }))  # fmt: skip
    (album / "license.txt").write_text("is licensed under: \nCC-BY-SA-3.0 (or, at your discretion, any later version)\n")
    pkg = PackageInfo("warzone2100-music", "4.3.3-3", "official music for warzone2100", "games", "GPL-2+",
                      tmp_path, 0, 0.0, 0.0)  # fmt: skip
    row = describe_track(album / "track4.opus", pkg)
    assert row["title"] == "Uncertain Future" and row["artist"] == "LupusMechanicus"
    assert row["album"] == "Legacy Soundtrack" and row["licence"] == "CC-BY-SA-3.0+"
    assert row["bpm"] == 80 and row["bpm_source"] == "album.json"
    assert row["caption"].startswith("electronic sci-fi game soundtrack, 'Uncertain Future' by LupusMechanicus")
    assert row["caption"].endswith("80 BPM")


# --------------------------------------------------------------------------- scores


def _tiny_score():
    from music21 import meter, note, stream, tempo

    part = stream.Part()
    part.append(meter.TimeSignature("3/4"))
    part.append(tempo.MetronomeMark(number=120))
    for pitch in ["C4", "E4", "G4", "C5", "G4", "E4"]:
        part.append(note.Note(pitch, quarterLength=1.0))
    return stream.Score([part])


def test_all_notes_off_is_appended_to_every_track(tmp_path):
    from music21 import midi

    from musiclora.data.scores import append_all_notes_off

    _tiny_score().write("midi", fp=str(tmp_path / "a.mid"))
    raw = (tmp_path / "a.mid").read_bytes()
    edited = append_all_notes_off(raw)
    mf = midi.MidiFile()
    mf.readstr(edited)
    for track in mf.tracks:
        events = [e for e in track.events if not e.isDeltaTime()]
        assert events[-1].type == midi.MetaEvents.END_OF_TRACK
        sustain_off = {e.channel for e in events if e.type == midi.ChannelVoiceMessages.CONTROLLER_CHANGE
                       and e.parameter1 == 64 and e.parameter2 == 0}  # fmt: skip
        notes_off = {e.channel for e in events if e.type == midi.ChannelModeMessages.ALL_NOTES_OFF}
        assert sustain_off == notes_off == set(range(1, 17))
    assert len(edited) == len(raw) + len(mf.tracks) * 16 * 2 * 4  # per track 32 events of 3 bytes + their deltas
    with pytest.raises(ValueError, match="Standard MIDI File"):
        append_all_notes_off(b"not midi")


@needs_fluidsynth
def test_render_is_bounded_in_time(tmp_path):
    from musiclora.data.scores import ScoreRenderError, render_midi

    _tiny_score().write("midi", fp=str(tmp_path / "a.mid"))
    with pytest.raises(ScoreRenderError, match="did not finish within"):
        render_midi(str(tmp_path / "a.mid"), str(tmp_path / "a.wav"), timeout_s=0.001)
    render_midi(str(tmp_path / "a.mid"), str(tmp_path / "a.wav"), timeout_s=60)
    audio, sr = sf.read(tmp_path / "a.wav")
    assert sr == 32_000 and audio.shape[1] == 2 and 3.0 <= len(audio) / sr <= 8.0  # 6 beats at 120 BPM + tail


@needs_fluidsynth
def test_a_bach_chorale_renders_with_an_analysed_caption(tmp_path):
    from musiclora.data.scores import SCORE_SETS, list_scores, render_score

    chorales = SCORE_SETS["bach-chorales-demo"]
    paths = list_scores(chorales)
    assert len(paths) == chorales.limit
    row = render_score(paths[1], chorales, 1, tmp_path)
    audio, sr = sf.read(row["path"])
    assert row["duration_s"] == pytest.approx(len(audio) / sr, abs=1e-3) and row["duration_s"] > 20
    assert row["instruments"] == "church organ" and row["metre"] == "4/4" and row["bpm"] == 72.0
    assert row["key"] == normalize_key(row["key"]) and f"in {row['key']}" in row["caption"]
    assert "Johann Sebastian Bach" in row["caption"] and np.abs(audio).max() == pytest.approx(10 ** (-1 / 20), abs=1e-3)
    assert render_score(paths[1], chorales, 1, tmp_path) == row  # cached
