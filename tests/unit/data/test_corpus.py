"""The bundled corpus: licences, captions, the build over an unpacked package, and (integration)
a real Debian music package."""

from __future__ import annotations

import json
import shutil

import mutagen.oggvorbis
import numpy as np
import pytest
import soundfile as sf

from musiclora.audio import load_audio
from musiclora.data.corpus import (
    CORPORA,
    build_caption,
    build_corpus,
    corpus_info_to_dict,
    detect_licence,
    fetch_package,
    read_tags,
)
from musiclora.data.metadata import load_metadata

# --------------------------------------------------------------------------- licences

CC_BY_SA_LEGALCODE = """
License

   THE WORK (AS DEFINED BELOW) IS PROVIDED UNDER THE TERMS OF THIS
   CREATIVE COMMONS PUBLIC LICENSE ("CCPL" OR "LICENSE").
    e. "License Elements" means the following high-level license
       attributes as selected by Licensor and indicated in the title of
       this License: Attribution, ShareAlike.
    b. You may Distribute an Adaptation only under the terms of a Creative
       Commons jurisdiction license (e.g., Attribution-ShareAlike 3.0 US)).

Debian packaging is licensed under GPLv2 or later, see the GNU General Public License version 2
or any later version.
"""

GPL_NOTICE = """
License:
        This program is free software; you can redistribute it and/or modify
        it under the terms of the GNU General Public License version 2
        or at your option any later version.

        src/lib is free software; you can redistribute it under the terms of the
        GNU Library General Public License as published by the Free Software Foundation;
        either version 2 of the License.
"""

DEP5 = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: tunes

Files: debian/*
License: GPL-2+

Files: *
Copyright: 2020 Someone
License: CC-BY-4.0
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (CC_BY_SA_LEGALCODE, "CC-BY-SA-3.0"),
        (GPL_NOTICE, "GPL-2+"),
        (DEP5, "CC-BY-4.0"),
        ("Licensed under http://creativecommons.org/licenses/by-nc/2.5/ only.", "CC-BY-NC-2.5"),
        ("GNU Lesser General Public License, version 3.", "LGPL-3"),
        ("All rights reserved.", "unknown"),
    ],
)
def test_detect_licence(text, expected):
    assert detect_licence(text) == expected


# --------------------------------------------------------------------------- captions and tags


def test_build_caption_from_tags():
    caption = build_caption(
        "orchestral fantasy game soundtrack", "Battle Music", "Doug Kaufman", "Battle for Wesnoth", "Game"
    )
    assert (
        caption
        == "orchestral fantasy game soundtrack, 'Battle Music' by Doug Kaufman, from Battle for Wesnoth"
    )
    with_genre = build_caption(
        "game soundtrack", "Elf Land", genre="Romantic Classical", description="Elvish."
    )
    assert with_genre.startswith("romantic classical game soundtrack, 'Elf Land'")
    assert with_genre.endswith("; elvish")
    assert "www" not in build_caption("x", "t", description="http://www.example.com")


def _write_ogg(path, seconds=1.5, sr=22050, amp=0.3, tags=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    x = (amp * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    sf.write(path, np.stack([x, x]).T, sr, format="OGG", subtype="VORBIS")
    if tags:
        f = mutagen.oggvorbis.OggVorbis(path)
        f.update(tags)
        f.save()


def test_read_tags(tmp_path):
    path = tmp_path / "song.ogg"
    _write_ogg(path, tags={"TITLE": "Nebula", "Artist": "Maxstack", "genre": ""})
    tags = read_tags(path)
    assert tags["title"] == "Nebula" and tags["artist"] == "Maxstack"  # keys lower-cased
    assert "genre" not in tags  # empty values dropped
    (tmp_path / "plain.txt").write_text("x")
    assert read_tags(tmp_path / "plain.txt") == {}


# --------------------------------------------------------------------------- the build, offline


def _fake_unpacked_package(cache_dir, package, section="games"):
    """Lay out a package as fetch_package leaves it, so build_corpus runs without apt."""
    root = cache_dir / "packages" / package
    doc = root / "usr" / "share" / "doc" / package
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(GPL_NOTICE)
    marker = {
        "package": package,
        "version": "1.0-1",
        "description": "music for a test game",
        "section": section,
        "licence": detect_licence(GPL_NOTICE),
        "deb_bytes": 0,
        "download_s": 0.0,
        "extract_s": 0.0,
    }
    (root / ".musiclora-package.json").write_text(json.dumps(marker))
    return root / "usr" / "share" / "games" / package / "music"


def test_build_corpus_from_unpacked_package(tmp_path):
    music = _fake_unpacked_package(tmp_path, "testgame-music")
    _write_ogg(music / "battle.ogg", tags={"title": "Battle Music", "artist": "A. Composer", "genre": "Epic"})
    _write_ogg(music / "calm_river.ogg", seconds=2.0, sr=44100)  # untagged: title from the file name
    _write_ogg(music / "silence.ogg", amp=0.0)
    _write_ogg(music / "blip.ogg", seconds=0.3)
    (music / "broken.ogg").write_bytes(b"OggS" + b"\0" * 100)
    (music / "readme.txt").write_text("not audio")

    info = build_corpus("test", cache_dir=tmp_path, packages=["testgame-music"], min_duration_s=1.0)

    rows = [json.loads(line) for line in info.metadata_path.read_text().splitlines()]
    assert info.num_tracks == len(rows) == 2
    by_title = {r["title"]: r for r in rows}
    assert set(by_title) == {"Battle Music", "Calm River"}
    assert by_title["Battle Music"]["caption"] == (
        "epic game soundtrack, 'Battle Music' by A. Composer, from music for a test game"
    )
    assert by_title["Calm River"]["genre"] == "game soundtrack"
    skipped = {p.rsplit("/", 1)[1]: why for p, why in info.skipped}
    assert set(skipped) == {"silence.ogg", "blip.ogg", "broken.ogg"}
    assert "silent" in skipped["silence.ogg"] and "shorter" in skipped["blip.ogg"]
    for row in rows:
        audio, sr = load_audio(row["path"])
        assert row["sample_rate"] == sr and row["channels"] == audio.shape[0]
        assert row["duration_s"] == pytest.approx(audio.shape[1] / sr, abs=1e-3)
        assert row["licence"] == "GPL-2+" and row["source_package"] == "testgame-music=1.0-1"
    assert info.total_duration_s == pytest.approx(sum(r["duration_s"] for r in rows))
    assert dict(info.sample_rates) == {22050: 1, 44100: 1} and dict(info.channels) == {2: 2}
    assert [t.caption for t in load_metadata(info.metadata_path)] == [r["caption"] for r in rows]
    assert json.dumps(corpus_info_to_dict(info))  # JSON-ready

    capped = build_corpus("test", cache_dir=tmp_path, packages=["testgame-music"], max_tracks=1)
    assert capped.num_tracks == 1


def test_build_corpus_rejects_unknown_names(tmp_path):
    with pytest.raises(KeyError, match="no-such-corpus"):
        build_corpus("no-such-corpus", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="max_tracks"):
        build_corpus("demo", cache_dir=tmp_path, max_tracks=0)
    assert "singularity-music" in CORPORA["demo"]


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs Debian's apt-get")
def test_fetch_unknown_package_names_it(tmp_path):
    with pytest.raises(RuntimeError, match="musiclora-no-such-package"):
        fetch_package("musiclora-no-such-package", tmp_path)
    with pytest.raises(ValueError, match="package name"):
        fetch_package("../etc", tmp_path)


# --------------------------------------------------------------------------- the real thing


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs Debian's apt-get")
def test_real_debian_package_builds_a_decodable_corpus(pytestconfig):
    """Downloads singularity-music (~51 MB, CC-BY-SA) once into pytest's cache folder."""
    cache_dir = pytestconfig.cache.mkdir("musiclora-corpus")
    info = build_corpus("singularity-test", cache_dir=cache_dir, max_tracks=3, packages=["singularity-music"])

    (pkg,) = info.packages
    assert pkg.licence.startswith("CC-BY-SA") and pkg.copyright_file.is_file()
    tracks = load_metadata(info.metadata_path)
    assert info.num_tracks == len(tracks) == 3
    for track in tracks:
        audio, sr = load_audio(track.path)
        assert track.caption.strip() and track.model_extra["title"] in track.caption
        assert track.model_extra["sample_rate"] == sr
        assert track.model_extra["duration_s"] == pytest.approx(audio.shape[1] / sr, abs=1e-3)
        assert audio.shape[1] / sr > 10  # real produced music, not stubs

    again = build_corpus(
        "singularity-test", cache_dir=cache_dir, max_tracks=3, packages=["singularity-music"]
    )
    assert again.packages[0].cached
    assert again.metadata_path.read_text() == info.metadata_path.read_text()
