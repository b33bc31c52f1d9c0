"""The bundled real corpus: produced music from Debian's music packages and scores rendered to audio.

`musiclora corpus build [--name NAME]` lands here. A corpus is a list of sources:

- a Debian music data package (``singularity-music``, ``wesnoth-1.16-music``,
  ``warzone2100-music``), fetched without installing it (`musiclora.data.debian`); every track is
  decoded once to check and measure it; tags, an ``album.json`` beside the files (warzone2100's:
  title, author, bpm per track) and the package's licence make its caption;
- ``music21:<set>``: scores that ship inside the music21 package, rendered to audio with
  FluidSynth and a General MIDI soundfont (`musiclora.data.scores`).

Captions join the metadata with simple analysis (`musiclora.data.analysis`): instrumentation,
key, metre and tempo in BPM from the score for rendered scores; for recorded tracks of at least
10 s an estimated key (when the music is clearly tonal) and tempo, unless the metadata gives one.

The result is a ``metadata.jsonl`` that `musiclora.data.metadata.load_metadata` reads like any
user's metadata: one JSON object a line with ``path`` (absolute), ``caption``, ``title``,
``artist``, ``album``, ``genre``, ``licence``, ``licence_file``, ``source_package``,
``duration_s``, ``sample_rate`` (Hz) and ``channels``, plus ``bpm``, ``key``, ``metre`` and
``instruments`` where known.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import soundfile as sf

from musiclora.audio import AudioDecodeError, is_silent, load_audio
from musiclora.data.analysis import MIN_ANALYSIS_S, analyse_audio, describe_music
from musiclora.data.debian import DEFAULT_CACHE_DIR, PackageInfo, detect_licence, fetch_package
from musiclora.data.metadata import AUDIO_SUFFIXES, build_caption, title_from_filename

__all__ = [
    "CORPORA",
    "DEFAULT_CACHE_DIR",
    "PACKAGE_STYLES",
    "CorpusInfo",
    "PackageInfo",
    "build_caption",
    "build_corpus",
    "corpus_info_to_dict",
    "describe_track",
    "detect_licence",
    "fetch_package",
    "find_audio_files",
    "read_tags",
]  # fmt: skip

log = logging.getLogger(__name__)

SCORES_PREFIX = "music21:"
# Corpus name -> sources, built in this order: Debian packages, or "music21:<set>" (see scores.SCORE_SETS).
CORPORA: dict[str, list[str]] = {
    # >= 30 min of three kinds of music (electronic, orchestral, rendered Baroque chorales).
    "demo": ["singularity-music", "wesnoth-1.16-music", "music21:bach-chorales-demo"],
    "games": ["singularity-music", "wesnoth-1.16-music", "warzone2100-music"],
    "scores": ["music21:bach-chorales", "music21:madrigals", "music21:piano"],
    "full": [
        "singularity-music", "wesnoth-1.16-music", "warzone2100-music",
        "music21:bach-chorales", "music21:string-quartets", "music21:madrigals", "music21:piano",
    ],
}  # fmt: skip

# Package -> style phrase that leads each caption (and is the genre when the tags have none).
PACKAGE_STYLES: dict[str, str] = {
    "singularity-music": "electronic game soundtrack",
    "wesnoth-1.16-music": "orchestral fantasy game soundtrack",
    "warzone2100-music": "electronic sci-fi game soundtrack",
}
MIN_KEY_STRENGTH = 0.6  # below this correlation an estimated key stays out of the caption
_SPDX_CC = re.compile(r"\bCC[- ]BY(?:[- ](?:SA|NC|ND))*[- ]\d\.\d\b(?:[^\n]{0,40}later version)?")


@dataclass
class CorpusInfo:
    """What `build_corpus` wrote.

    Attributes:
        name: corpus name.
        metadata_path: the metadata.jsonl written (absolute).
        num_tracks: rows in metadata.jsonl.
        total_duration_s: summed track length in seconds.
        packages: the Debian packages used, in order.
        score_sets: the music21 score sets rendered, in order.
        skipped: (path, reason) for each input left out (undecodable, silent, too short, unrenderable).
        sample_rates: native sample rate in Hz -> number of tracks.
        channels: channel count -> number of tracks.
        build_s: wall seconds the build took.
    """

    name: str
    metadata_path: Path
    num_tracks: int = 0
    total_duration_s: float = 0.0
    packages: list[PackageInfo] = field(default_factory=list)
    score_sets: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    sample_rates: Counter = field(default_factory=Counter)
    channels: Counter = field(default_factory=Counter)
    build_s: float = 0.0


# --------------------------------------------------------------------------- tracks and captions


def read_tags(path: str | os.PathLike) -> dict[str, str]:
    """Read a file's text tags (Vorbis comments, ID3, MP4, FLAC) with mutagen's easy interface.

    Args:
        path: audio file.

    Returns:
        Lower-case tag name -> first value, stripped; empty when the file has no readable tags.
    """
    import mutagen

    try:
        f = mutagen.File(os.fspath(path), easy=True)
    except (mutagen.MutagenError, OSError, ValueError) as exc:  # tags are optional
        log.debug("no tags in %s: %r", path, exc)
        return {}
    if f is None or not f.tags:
        return {}
    out = {}
    for key, values in f.tags.items():
        value = values[0] if isinstance(values, list) and values else values
        if isinstance(value, str) and value.strip():
            out[key.lower()] = value.strip()
    return out


def find_audio_files(root: str | os.PathLike) -> list[Path]:
    """Audio files (by suffix, see AUDIO_SUFFIXES) under `root`, sorted, dangling links skipped."""
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())


def album_entry(path: Path) -> tuple[dict, dict]:
    """The ``album.json`` beside a track (warzone2100's format) and the track's entry in it.

    Returns:
        (album fields without "tracks", the entry whose "filename" is the track's), either
        empty when there is no such file or entry.
    """
    album_file = path.parent / "album.json"
    if not album_file.is_file():
        return {}, {}
    try:
        album = json.loads(album_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %r", album_file, exc)
        return {}, {}
    entry = next((t for t in album.get("tracks", []) if t.get("filename") == path.name), {})
    return {k: v for k, v in album.items() if k != "tracks"}, entry


def _album_licence(path: Path) -> str | None:
    """An SPDX-like licence from a ``license.txt`` beside the track (e.g. "CC-BY-SA-3.0+"), if any."""
    lic = path.parent / "license.txt"
    if not lic.is_file():
        return None
    text = lic.read_text(errors="replace")
    m = _SPDX_CC.search(text)
    if not m:
        found = detect_licence(text)
        return None if found == "unknown" else found
    spdx = re.match(r"CC[- ]BY(?:[- ](?:SA|NC|ND))*[- ]\d\.\d", m.group(0)).group(0).replace(" ", "-").upper()
    return spdx + ("+" if m.group(0).endswith("later version") else "")


def describe_track(path: Path, pkg: PackageInfo, verify: bool = True) -> dict:
    """Build the metadata row of one packaged track.

    Args:
        path: the audio file (absolute).
        pkg: the package it came from.
        verify: decode the whole file (catches corrupt files, measures exactly, finds silence,
            and allows the key/tempo analysis); False reads only the header.

    Returns:
        The metadata.jsonl row as a dict (see the module docstring).

    Raises:
        AudioDecodeError: if the file does not decode, or (with `verify`) is silent.
    """
    audio = None
    if verify:
        audio, sr = load_audio(path)
        if is_silent(audio):
            raise AudioDecodeError(str(path), "silent (RMS below -60 dBFS)")
        channels, num_samples = audio.shape
    else:
        try:
            info = sf.info(str(path))
        except (sf.SoundFileError, RuntimeError) as exc:
            raise AudioDecodeError(str(path), str(exc)) from exc
        sr, channels, num_samples = info.samplerate, info.channels, info.frames
    tags = read_tags(path)
    album_info, entry = album_entry(path)
    style = PACKAGE_STYLES.get(pkg.package) or ("game soundtrack" if pkg.section == "games" else "music")
    title = entry.get("title") or tags.get("title") or title_from_filename(path)
    artist = entry.get("author") or tags.get("artist") or tags.get("composer") or album_info.get("author")
    album = album_info.get("title") or tags.get("album") or pkg.description or None
    caption = build_caption(style, title, artist, album, tags.get("genre"), tags.get("description"))
    row = {
        "path": str(path),
        "caption": caption,
        "title": title,
        "artist": artist,
        "album": album,
        "genre": tags.get("genre") or style,
        "licence": _album_licence(path) or pkg.licence,
        "licence_file": str(pkg.copyright_file),
        "source_package": f"{pkg.package}={pkg.version}",
        "duration_s": round(num_samples / sr, 3),
        "sample_rate": int(sr),
        "channels": int(channels),
    }
    bpm = entry.get("bpm")
    if bpm:
        row.update(bpm=float(bpm), bpm_source="album.json")
    if audio is not None and num_samples >= MIN_ANALYSIS_S * sr:
        found = analyse_audio(audio, sr)
        row.setdefault("bpm", found.bpm)
        row.setdefault("bpm_source", "estimated")
        row.update(key_estimate=found.key, key_strength=found.key_strength)
        if found.key_strength >= MIN_KEY_STRENGTH:
            row["key"] = found.key
    music = describe_music(row.get("key"), None, row.get("bpm"))
    if music:
        row["caption"] = f"{caption}; {music}"
    return row


def _describe_job(args: tuple[str, PackageInfo, bool]) -> dict | tuple[str, str]:
    path, pkg, verify = args
    try:
        return describe_track(Path(path), pkg, verify)
    except AudioDecodeError as exc:
        return (exc.path, exc.reason)


# --------------------------------------------------------------------------- the corpus


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not sys.stderr.isatty(),
    )


class _Pool:
    """Runs describe/render jobs in order on worker threads.

    Threads, not processes: libsndfile decoding and the FluidSynth subprocess run outside the
    GIL, and threads need neither a `__main__` guard in the caller (spawn) nor a thread-free
    parent (fork).
    """

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self.pool: ThreadPoolExecutor | None = None

    def map(self, fn, jobs: list) -> list:
        if self.workers == 1 or len(jobs) < 2:
            return [fn(job) for job in jobs]
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="corpus")
        return list(self.pool.map(fn, jobs))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _take(pool: _Pool, fn, jobs: list, cap: int | None, label: str, info: CorpusInfo, min_duration_s: float) -> list[dict]:
    """Run jobs in chunks until `cap` rows are taken; skips go to `info.skipped`."""
    rows: list[dict] = []
    chunk = max(2, 2 * pool.workers)
    with _progress() as bar:
        task = bar.add_task(label, total=len(jobs) if cap is None else min(cap, len(jobs)))
        for i in range(0, len(jobs), chunk):
            if cap is not None and len(rows) >= cap:
                break
            for result in pool.map(fn, jobs[i : i + chunk]):
                if isinstance(result, tuple):
                    info.skipped.append(result)
                    log.warning("skipping %s: %s", *result)
                elif result["duration_s"] < min_duration_s:
                    info.skipped.append((result["path"], f"shorter than {min_duration_s} s"))
                elif cap is None or len(rows) < cap:
                    rows.append(result)
                    bar.advance(task)
    return rows


def _package_rows(package, cache_dir, cap, verify, pool, info, min_duration_s) -> list[dict]:
    pkg = fetch_package(package, cache_dir)
    info.packages.append(pkg)
    files = find_audio_files(pkg.root)
    if not files:
        log.warning("%s holds no audio files (suffixes %s)", package, sorted(AUDIO_SUFFIXES))
    jobs = [(str(p), pkg, verify) for p in files]
    return _take(pool, _describe_job, jobs, cap, package, info, min_duration_s)


def _score_rows(set_name, cache_dir, cap, pool, info, min_duration_s) -> list[dict]:
    from musiclora.data.scores import (
        SCORE_SETS,
        _render_job,
        find_fluidsynth,
        find_soundfont,
        list_scores,
        music21_corpus_dir,
    )

    if set_name not in SCORE_SETS:
        raise KeyError(f"unknown music21 score set {set_name!r}; known: {sorted(SCORE_SETS)}")
    find_fluidsynth(), find_soundfont(), music21_corpus_dir()  # fail early, naming what to install
    score_set = SCORE_SETS[set_name]
    info.score_sets.append(set_name)
    out_dir = Path(cache_dir).absolute() / "scores" / set_name
    jobs = [(str(p), set_name, i, str(out_dir)) for i, p in enumerate(list_scores(score_set))]
    return _take(pool, _render_job, jobs, cap, f"{SCORES_PREFIX}{set_name}", info, min_duration_s)


def build_corpus(
    name: str = "demo",
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
    max_tracks: int | None = None,
    *,
    packages: list[str] | None = None,
    min_duration_s: float = 1.0,
    verify: bool = True,
    workers: int | None = None,
) -> CorpusInfo:
    """Fetch or render a corpus's sources and write ``<cache_dir>/<name>/metadata.jsonl``.

    Args:
        name: corpus name, a key of CORPORA (any name when `packages` is given).
        cache_dir: cache root; packages unpack under ``<cache_dir>/packages/``, rendered scores
            go to ``<cache_dir>/scores/``.
        max_tracks: cap on the tracks listed, shared evenly over the sources (each source's
            first tracks by path); None lists all.
        packages: sources (Debian packages or ``music21:<set>``) to use instead of ``CORPORA[name]``.
        min_duration_s: tracks shorter than this (seconds) are skipped.
        verify: decode every packaged track fully (see `describe_track`).
        workers: threads that decode, analyse and render (default: the CPU count, at most 4).

    Returns:
        Counts, total seconds, sample rates and channel counts seen, skipped files, sources.

    Raises:
        KeyError: if `name` is not a known corpus and no `packages` are given, or a score set is unknown.
        ValueError: if `max_tracks` < 1.
        RuntimeError: if a package cannot be fetched (see `fetch_package`), or fluidsynth or a
            soundfont is missing for a score set.
    """
    if packages is None:
        if name not in CORPORA:
            raise KeyError(f"unknown corpus {name!r}; known: {sorted(CORPORA)} (or pass packages=[...])")
        packages = CORPORA[name]
    if max_tracks is not None and max_tracks < 1:
        raise ValueError(f"max_tracks must be >= 1 or None, got {max_tracks}")
    out_dir = Path(cache_dir).absolute() / name
    out_dir.mkdir(parents=True, exist_ok=True)
    info = CorpusInfo(name=name, metadata_path=out_dir / "metadata.jsonl")
    per_source = None if max_tracks is None else -(-max_tracks // len(packages))
    pool = _Pool(workers or min(4, os.cpu_count() or 1))
    rows: list[dict] = []
    t0 = time.perf_counter()
    try:
        for source in packages:
            if source.startswith(SCORES_PREFIX):
                rows += _score_rows(source[len(SCORES_PREFIX) :], cache_dir, per_source, pool, info, min_duration_s)
            else:
                rows += _package_rows(source, cache_dir, per_source, verify, pool, info, min_duration_s)
    finally:
        pool.close()
    if max_tracks is not None:
        rows = rows[:max_tracks]
    for row in rows:
        info.sample_rates[row["sample_rate"]] += 1
        info.channels[row["channels"]] += 1
        info.total_duration_s += row["duration_s"]
    info.num_tracks = len(rows)
    tmp = info.metadata_path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, info.metadata_path)
    info.build_s = round(time.perf_counter() - t0, 2)
    log.info(
        "corpus %r: %d tracks, %.1f min, %d skipped, in %.1f s -> %s",
        name, info.num_tracks, info.total_duration_s / 60, len(info.skipped), info.build_s, info.metadata_path,
    )  # fmt: skip
    return info


def corpus_info_to_dict(info: CorpusInfo) -> dict:
    """A JSON-ready summary of a CorpusInfo (paths as strings, counters as dicts)."""
    out = asdict(info)
    out["metadata_path"] = str(info.metadata_path)
    out["packages"] = [{**asdict(p), "root": str(p.root)} for p in info.packages]
    out["sample_rates"] = dict(info.sample_rates)
    out["channels"] = dict(info.channels)
    out["total_minutes"] = round(info.total_duration_s / 60, 2)
    return out
