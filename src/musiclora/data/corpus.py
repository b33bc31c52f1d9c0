"""The bundled real corpus: produced music from Debian's music data packages.

`musiclora corpus build` lands here. Each corpus is a list of Debian packages; each package is
fetched with ``apt-get download`` and unpacked with ``dpkg -x`` into a cache folder (nothing is
installed on the system), its licence is read from the package's own
``usr/share/doc/<package>/copyright``, and every track is decoded once to check it and measure it.
The result is a ``metadata.jsonl`` that `musiclora.data.metadata.load_metadata` reads like any
user's metadata: one JSON object a line with ``path`` (absolute), ``caption``, ``title``,
``artist``, ``album``, ``genre``, ``licence``, ``licence_file``, ``source_package``,
``duration_s``, ``sample_rate`` (Hz) and ``channels``.

Needs Debian's ``apt-get`` and ``dpkg`` with package lists present (``apt-get update`` once).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import soundfile as sf

from musiclora.data.audio import AudioDecodeError, is_silent, load_audio
from musiclora.data.metadata import AUDIO_SUFFIXES, title_from_filename

log = logging.getLogger(__name__)

# Corpus name -> Debian packages, fetched in this order. Add corpora here
# (e.g. "warzone2100-music", or packages of rendered MIDI scores).
CORPORA: dict[str, list[str]] = {
    "demo": ["singularity-music", "wesnoth-1.16-music"],
    "games": ["singularity-music", "wesnoth-1.16-music", "warzone2100-music"],
}

# Package -> style phrase that leads each caption (and is the genre when the tags have none).
PACKAGE_STYLES: dict[str, str] = {
    "singularity-music": "electronic game soundtrack",
    "wesnoth-1.16-music": "orchestral fantasy game soundtrack",
    "warzone2100-music": "electronic sci-fi game soundtrack",
}

DEFAULT_CACHE_DIR = Path(".musiclora/cache/corpus")
_MARKER = ".musiclora-package.json"


@dataclass(frozen=True)
class PackageInfo:
    """One Debian package unpacked in the cache.

    Attributes:
        package: Debian package name.
        version: Debian version string.
        description: the package's one-line description.
        section: Debian section (e.g. "games").
        licence: licence read from the package's copyright file (SPDX-like, e.g. "GPL-2+").
        root: folder the package was unpacked into (absolute).
        deb_bytes: size of the downloaded .deb in bytes.
        download_s: seconds ``apt-get download`` took (when it was fetched).
        extract_s: seconds ``dpkg -x`` took (when it was fetched).
        cached: True when this call found it already unpacked and fetched nothing.
    """

    package: str
    version: str
    description: str
    section: str
    licence: str
    root: Path
    deb_bytes: int
    download_s: float
    extract_s: float
    cached: bool = False

    @property
    def copyright_file(self) -> Path:
        """Path of the package's Debian copyright file (may not exist)."""
        return self.root / "usr" / "share" / "doc" / self.package / "copyright"


@dataclass
class CorpusInfo:
    """What `build_corpus` wrote.

    Attributes:
        name: corpus name.
        metadata_path: the metadata.jsonl written (absolute).
        num_tracks: rows in metadata.jsonl.
        total_duration_s: summed track length in seconds.
        packages: the packages used, in order.
        skipped: (path, reason) for each audio file left out (undecodable, silent, too short).
        sample_rates: native sample rate in Hz -> number of tracks.
        channels: channel count -> number of tracks.
    """

    name: str
    metadata_path: Path
    num_tracks: int = 0
    total_duration_s: float = 0.0
    packages: list[PackageInfo] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    sample_rates: Counter = field(default_factory=Counter)
    channels: Counter = field(default_factory=Counter)


# --------------------------------------------------------------------------- licences


def _earliest(*hits: tuple[int, str] | None) -> str | None:
    found = [h for h in hits if h is not None]
    return min(found)[1] if found else None


def _dep5_licence(text: str) -> str | None:
    """First ``License:`` of a machine-readable (DEP-5) copyright file, preferring ``Files: *``."""
    if not re.match(r"\s*Format:\s*\S*copyright-format", text):
        return None
    for stanza in re.split(r"\n\s*\n", text):
        if re.search(r"^Files:\s*\*\s*$", stanza, re.MULTILINE):
            m = re.search(r"^License:\s*(\S.*)$", stanza, re.MULTILINE)
            if m:
                return m.group(1).strip()
    m = re.search(r"^License:\s*(\S.*)$", text, re.MULTILINE)
    return m.group(1).strip() if m else None


def _cc_licence(flat: str) -> tuple[int, str] | None:
    m = re.search(r"creativecommons\.org/licenses/([a-z-]+)/(\d\.\d)", flat, re.IGNORECASE)
    if m:
        return m.start(), f"CC-{m.group(1).upper()}-{m.group(2)}"
    m = re.search(r"creative commons", flat, re.IGNORECASE)
    if not m:
        return None
    codes = {"attribution": "BY", "noncommercial": "NC", "noderivs": "ND", "sharealike": "SA"}
    el = re.search(r"title of this License:\s*([A-Za-z, -]+)\.", flat)
    parts = [codes[w] for w in re.findall(r"[A-Za-z]+", el.group(1).lower()) if w in codes] if el else []
    ver = re.search(r"\bAttribution[A-Za-z-]*\s+(\d\.\d)\b", flat)
    name = "CC-" + "-".join(parts or ["BY"]) + (f"-{ver.group(1)}" if ver else "")
    return m.start(), name


def _gpl_licence(flat: str) -> tuple[int, str] | None:
    m = re.search(
        r"GNU (Lesser |Library )?General Public License(.{0,120}?)version (\d)(.{0,80})", flat, re.IGNORECASE
    )
    if not m:
        return None
    kind = "LGPL" if m.group(1) else "GPL"
    later = re.search(r"later version", m.group(4), re.IGNORECASE)
    return m.start(), f"{kind}-{m.group(3)}{'+' if later else ''}"


def detect_licence(text: str) -> str:
    """Name the main licence of a Debian copyright file.

    A machine-readable (DEP-5) file gives the ``License:`` of its ``Files: *`` stanza. Otherwise
    the earliest-mentioned of Creative Commons (elements and version from the legal code) and
    GNU (L)GPL (version, "+" for "or any later version") wins, so a trailing note about the
    Debian packaging's own licence does not mask the work's.

    Args:
        text: the copyright file's contents.

    Returns:
        An SPDX-like name such as "CC-BY-SA-3.0" or "GPL-2+", or "unknown".
    """
    dep5 = _dep5_licence(text)
    if dep5:
        return dep5
    flat = " ".join(text.split())
    return _earliest(_cc_licence(flat), _gpl_licence(flat)) or "unknown"


# --------------------------------------------------------------------------- fetching


def _run(cmd: list[str], cwd: Path, what: str) -> str:
    if shutil.which(cmd[0]) is None:
        raise RuntimeError(f"{what}: `{cmd[0]}` not found; building a corpus needs Debian's apt-get and dpkg")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-800:]
        raise RuntimeError(f"{what}: `{' '.join(cmd)}` failed (exit {proc.returncode}): {tail}")
    return proc.stdout


def _deb_fields(deb: Path) -> dict[str, str]:
    out = _run(
        ["dpkg-deb", "-f", str(deb), "Version", "Description", "Section"], deb.parent, f"reading {deb}"
    )
    fields = {}
    for line in out.splitlines():
        if ":" in line and not line.startswith(" "):
            key, value = line.split(":", 1)
            fields[key.strip()] = value.strip()
    return fields


def fetch_package(package: str, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> PackageInfo:
    """Download a Debian package and unpack it under ``<cache_dir>/packages/<package>``.

    Idempotent: an already unpacked package (its marker file present) is not fetched again.
    Unpacking goes to a temporary folder renamed into place, so an interrupted run leaves no
    half-unpacked package behind. The .deb is deleted after unpacking.

    Args:
        package: Debian package name, e.g. "singularity-music".
        cache_dir: cache root.

    Returns:
        The package's info; `cached` says whether anything was fetched.

    Raises:
        RuntimeError: if apt-get or dpkg is missing or fails (unknown package, no package lists:
            run ``apt-get update``), naming the package.
    """
    if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", package):
        raise ValueError(f"not a Debian package name: {package!r}")
    packages_dir = Path(cache_dir).absolute() / "packages"
    root = packages_dir / package
    marker = root / _MARKER
    if marker.is_file():
        meta = json.loads(marker.read_text())
        meta.update(root=root, cached=True)
        return PackageInfo(**meta)
    packages_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=packages_dir, prefix=f".{package}.") as tmp:
        tmp_path = Path(tmp)
        cmd = ["apt-get", "download", package]
        if hasattr(os, "geteuid") and os.geteuid() == 0:  # root: apt's _apt user cannot write here
            cmd[1:1] = ["-o", "APT::Sandbox::User=root"]
        t0 = time.perf_counter()
        _run(cmd, tmp_path, f"downloading Debian package {package!r}")
        download_s = time.perf_counter() - t0
        debs = sorted(tmp_path.glob("*.deb"))
        if len(debs) != 1:
            raise RuntimeError(f"downloading Debian package {package!r}: expected one .deb, got {debs}")
        deb = debs[0]
        fields = _deb_fields(deb)
        unpacked = tmp_path / "root"
        t0 = time.perf_counter()
        _run(["dpkg", "-x", str(deb), str(unpacked)], tmp_path, f"unpacking Debian package {package!r}")
        extract_s = time.perf_counter() - t0
        copyright_file = unpacked / "usr" / "share" / "doc" / package / "copyright"
        licence = (
            detect_licence(copyright_file.read_text(errors="replace"))
            if copyright_file.is_file()
            else "unknown"
        )
        meta = {
            "package": package,
            "version": fields.get("Version", ""),
            "description": fields.get("Description", ""),
            "section": fields.get("Section", ""),
            "licence": licence,
            "deb_bytes": deb.stat().st_size,
            "download_s": round(download_s, 3),
            "extract_s": round(extract_s, 3),
        }
        (unpacked / _MARKER).write_text(json.dumps(meta, indent=1))
        if marker.is_file():  # another process finished the same package meanwhile
            return fetch_package(package, cache_dir)
        if root.exists():  # a marker-less leftover of an interrupted older run
            shutil.rmtree(root)
        os.replace(unpacked, root)
    log.info(
        "%s %s: downloaded %.1f MiB in %.1f s, unpacked in %.1f s, licence %s",
        package, meta["version"], meta["deb_bytes"] / 2**20, download_s, extract_s, licence,
    )  # fmt: skip
    return PackageInfo(**meta, root=root)


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


def build_caption(
    style: str,
    title: str,
    artist: str | None = None,
    album: str | None = None,
    genre: str | None = None,
    description: str | None = None,
) -> str:
    """Compose a text prompt for a track from its tags.

    Example: "romantic classical orchestral fantasy game soundtrack, 'Battle Music' by
    Aleksi Aubry-Carlson, from The Battle for Wesnoth OST".

    Args:
        style: leading style phrase (e.g. "orchestral fantasy game soundtrack").
        title: track title.
        artist: performer or composer, if known.
        album: album or game, if known.
        genre: tagged genre; prefixed to `style` unless all its words are already in it.
        description: free-text tag, appended after a semicolon unless it is a web link.

    Returns:
        The caption, a non-empty string.
    """
    lead = style
    if genre and not set(genre.lower().split()) <= set(style.lower().split()):
        lead = f"{genre.lower()} {style}"
    caption = f"{lead}, '{title}'"
    if artist:
        caption += f" by {artist}"
    if album:
        caption += f", from {album}"
    if description and not re.search(r"://|^www\.", description):  # skip links in description tags
        caption += f"; {description[0].lower()}{description[1:]}".rstrip(".")
    return caption


def find_audio_files(root: str | os.PathLike) -> list[Path]:
    """Audio files (by suffix, see AUDIO_SUFFIXES) under `root`, sorted, dangling links skipped."""
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())


def describe_track(path: Path, pkg: PackageInfo, verify: bool = True) -> dict:
    """Build the metadata row of one packaged track.

    Args:
        path: the audio file (absolute).
        pkg: the package it came from.
        verify: decode the whole file (catches corrupt files, measures exactly, finds silence);
            False reads only the header.

    Returns:
        The metadata.jsonl row as a dict (see the module docstring).

    Raises:
        AudioDecodeError: if the file does not decode, or (with `verify`) is silent.
    """
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
    style = PACKAGE_STYLES.get(pkg.package) or ("game soundtrack" if pkg.section == "games" else "music")
    title = tags.get("title") or title_from_filename(path)
    artist = tags.get("artist") or tags.get("composer")
    album = tags.get("album") or pkg.description or None
    caption = build_caption(style, title, artist, album, tags.get("genre"), tags.get("description"))
    return {
        "path": str(path),
        "caption": caption,
        "title": title,
        "artist": artist,
        "album": album,
        "genre": tags.get("genre") or style,
        "licence": pkg.licence,
        "licence_file": str(pkg.copyright_file),
        "source_package": f"{pkg.package}={pkg.version}",
        "duration_s": round(num_samples / sr, 3),
        "sample_rate": int(sr),
        "channels": int(channels),
    }


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


def build_corpus(
    name: str = "demo",
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
    max_tracks: int | None = None,
    *,
    packages: list[str] | None = None,
    min_duration_s: float = 1.0,
    verify: bool = True,
) -> CorpusInfo:
    """Fetch a corpus's packages and write ``<cache_dir>/<name>/metadata.jsonl``.

    Args:
        name: corpus name, a key of CORPORA (any name when `packages` is given).
        cache_dir: cache root; packages unpack under ``<cache_dir>/packages/``.
        max_tracks: cap on the tracks listed, shared evenly over the packages (each package's
            first tracks by path); None lists all.
        packages: Debian packages to use instead of ``CORPORA[name]``.
        min_duration_s: tracks shorter than this (seconds) are skipped.
        verify: decode every track fully (see `describe_track`).

    Returns:
        Counts, total seconds, sample rates and channel counts seen, skipped files, packages.

    Raises:
        KeyError: if `name` is not a known corpus and no `packages` are given.
        ValueError: if `max_tracks` < 1.
        RuntimeError: if a package cannot be fetched (see `fetch_package`).
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
    per_package = None if max_tracks is None else -(-max_tracks // len(packages))
    rows: list[dict] = []
    t0 = time.perf_counter()
    for package in packages:
        pkg = fetch_package(package, cache_dir)
        info.packages.append(pkg)
        files = find_audio_files(pkg.root)
        if not files:
            log.warning("%s holds no audio files (suffixes %s)", package, sorted(AUDIO_SUFFIXES))
        taken = 0
        with _progress() as bar:
            task = bar.add_task(package, total=len(files))
            for path in files:
                if per_package is not None and taken >= per_package:
                    break
                bar.advance(task)
                try:
                    row = describe_track(path, pkg, verify=verify)
                except AudioDecodeError as exc:
                    info.skipped.append((str(path), exc.reason))
                    log.warning("skipping %s", exc)
                    continue
                if row["duration_s"] < min_duration_s:
                    info.skipped.append((str(path), f"shorter than {min_duration_s} s"))
                    continue
                rows.append(row)
                taken += 1
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
    log.info(
        "corpus %r: %d tracks, %.1f min, %d skipped, in %.1f s -> %s",
        name, info.num_tracks, info.total_duration_s / 60, len(info.skipped), time.perf_counter() - t0,
        info.metadata_path,
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
