"""A user's own music: metadata files (JSONL or CSV) and plain folders of audio.

A metadata file lists one track per row with at least ``path`` and ``caption``; ``genre``,
``bpm``, ``key`` and ``mood`` are optional, and any other columns are kept as extra fields.
Relative paths are resolved against the folder that holds the metadata file. Files and folders
may be local paths or fsspec URLs (``s3://bucket/music/metadata.jsonl``).

Example JSONL row::

    {"path": "jazz/take_five.flac", "caption": "cool jazz quartet, alto sax lead", "bpm": 172}

Example CSV::

    path,caption,genre,bpm,key,mood
    jazz/take_five.flac,"cool jazz quartet, alto sax lead",jazz,172,Eb minor,relaxed
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re

from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".m4a"})
REQUIRED_COLUMNS = ("path", "caption")
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


class TrackMeta(BaseModel):
    """One training track.

    Attributes:
        path: absolute local path or fsspec URL of the audio file.
        caption: the text prompt describing the music (non-empty).
        genre: optional genre.
        bpm: optional tempo in beats per minute (> 0).
        key: optional musical key, free text (e.g. "Eb minor").
        mood: optional mood, free text.
        melody_path: optional second file of the same track (a stem, or a sung / hummed take, as in
            voice-to-music) whose chroma conditions MusicGen-Melody instead of the mix's; same timing.
        cond_audio: optional second file whose CLAP audio embedding conditions AudioLDM; same timing.
    Extra columns (e.g. the bundled corpus's ``artist``, ``licence``, ``duration_s``) are kept.
    """

    model_config = ConfigDict(extra="allow", str_strip_whitespace=True)

    path: str = Field(min_length=1)
    caption: str = Field(min_length=1)
    genre: str | None = None
    bpm: float | None = Field(default=None, gt=0)
    key: str | None = None
    mood: str | None = None
    melody_path: str | None = None
    cond_audio: str | None = None

    @field_validator("genre", "bpm", "key", "mood", "melody_path", "cond_audio", mode="before")
    @classmethod
    def _blank_is_none(cls, value):
        return None if isinstance(value, str) and not value.strip() else value


def _is_url(path: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path) is not None


def _resolve(track_path: str, base: str) -> str:
    """Absolute path/URL of `track_path`, relative ones taken from the folder `base`."""
    if _is_url(track_path) or os.path.isabs(track_path):
        return track_path
    if _is_url(base):
        protocol, rest = base.split("://", 1)
        return f"{protocol}://{posixpath.normpath(posixpath.join(rest, track_path))}"
    return os.path.normpath(os.path.join(base, track_path))


def _base_folder(source: str) -> str:
    if _is_url(source):
        return source.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(source))


class _Rows:
    """Collects row problems: raises the first one (strict) or records it as a skip (lenient)."""

    def __init__(self, source: str, lenient: bool) -> None:
        self.source, self.lenient = source, lenient
        self.tracks: list[TrackMeta] = []
        self.skipped: list[dict[str, str]] = []

    def problem(self, message: str, path: str | None = None, cause: Exception | None = None) -> None:
        if not self.lenient:
            raise ValueError(f"{self.source}: {message}") from cause
        self.skipped.append({"path": path or self.source, "reason": f"metadata {self.source}: {message}"})


def _decode_lines(raw: bytes, source: str, rows: _Rows) -> tuple[list[str], set[int]]:
    """Decode UTF-8 (a BOM is allowed) line by line so an error can name its line.

    Returns the lines (undecodable ones decoded with U+FFFD replacements) and the numbers of the
    undecodable lines; in strict mode the first undecodable line raises instead.
    """
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    out, bad = [], set()
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            out.append(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            if not rows.lenient:
                raise ValueError(
                    f"{source}: line {number} is not valid UTF-8 (byte {exc.start}: {line[exc.start : exc.start + 1]!r}); "
                    "save the metadata file as UTF-8"
                ) from exc
            out.append(line.decode("utf-8", errors="replace"))
            bad.add(number)
    return out, bad


def _make_track(row: dict, base: str, source: str, where: str) -> TrackMeta:
    missing = [c for c in REQUIRED_COLUMNS if row.get(c) is None or str(row[c]).strip() == ""]
    if missing:
        raise ValueError(f"{source}: {where} has no {' or '.join(repr(c) for c in missing)} (required)")
    try:
        track = TrackMeta.model_validate(row)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"{source}: {where}: {problems}") from exc
    track.path = _resolve(track.path, base)
    for paired in ("melody_path", "cond_audio"):
        if getattr(track, paired):
            setattr(track, paired, _resolve(getattr(track, paired), base))
    return track


def _add_row(rows: _Rows, row: dict, base: str, where: str, undecodable: bool) -> None:
    path = row.get("path")
    path = _resolve(str(path), base) if isinstance(path, str) and path.strip() else None
    if undecodable:
        rows.problem(f"{where} is not valid UTF-8 (a caption or other field); save the metadata file as UTF-8", path)
        return
    try:
        rows.tracks.append(_make_track(row, base, rows.source, where))
    except ValueError as exc:
        rows.problem(str(exc).removeprefix(f"{rows.source}: "), path, exc)


def _parse_jsonl(lines: list[str], bad: set[int], base: str, rows: _Rows) -> None:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            rows.problem(f"line {number} is not valid JSON ({exc.msg})", cause=exc)
            continue
        if not isinstance(row, dict):
            rows.problem(f"line {number} is a JSON {type(row).__name__}, expected an object")
            continue
        _add_row(rows, row, base, f"line {number}", number in bad)


def _parse_csv(lines: list[str], bad: set[int], base: str, rows: _Rows) -> None:
    reader = csv.DictReader(io.StringIO("\n".join(lines)))
    columns = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:  # a file-level mistake: no row can be right, so even lenient loading stops
        raise ValueError(
            f"{rows.source}: missing required column {', '.join(repr(c) for c in missing)} (header has {columns})"
        )
    for row in reader:
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue
        clean = {(k or "").strip(): v for k, v in row.items() if k is not None}
        _add_row(rows, clean, base, f"line {reader.line_num}", reader.line_num in bad)


def _read_metadata(source: str, lenient: bool) -> _Rows:
    from musiclora.storage import open_url

    with open_url(source, "rb") as f:
        raw = f.read()
    rows = _Rows(source, lenient)
    lines, bad = _decode_lines(raw, source, rows)
    base = _base_folder(source)
    suffix = posixpath.splitext(source.lower())[1]
    first = next((line.lstrip() for line in lines if line.strip()), "")
    if suffix in _JSONL_SUFFIXES or (suffix != ".csv" and first.startswith("{")):
        _parse_jsonl(lines, bad, base, rows)
    else:
        _parse_csv(lines, bad, base, rows)
    if not rows.tracks and not rows.skipped:
        raise ValueError(f"{source}: holds no tracks")
    return rows


def load_metadata(path_or_url: str | os.PathLike) -> list[TrackMeta]:
    """Read a metadata file of tracks and captions, strictly: the first bad row raises.

    The format comes from the suffix: ``.jsonl`` / ``.ndjson`` / ``.json`` (one JSON object a
    line) or ``.csv`` (header row; empty optional cells are None). Other suffixes are sniffed:
    a first non-blank line starting with ``{`` is JSONL, anything else CSV. Blank lines are
    skipped. Audio files are not opened here (they may be remote); `prepare` counts missing ones.

    Args:
        path_or_url: local path or fsspec URL of the metadata file.

    Returns:
        The tracks in file order, `path` made absolute (relative paths are resolved against the
        metadata file's folder; URLs and absolute paths are kept).

    Raises:
        FileNotFoundError: if the file does not exist.
        StorageError: the store holding it is unreachable, refuses the keys or lacks the bucket.
        ValueError: naming the file (and line or column) if it is not UTF-8, has a malformed
            row, lacks the ``path`` or ``caption`` column, has an invalid value (e.g. bpm <= 0),
            or holds no tracks.
    """
    return _read_metadata(os.fspath(path_or_url), lenient=False).tracks


METADATA_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.ndjson")


def load_tracks(source: str | os.PathLike) -> tuple[list[TrackMeta], list[dict[str, str]]]:
    """Read `prepare`'s input leniently: a metadata file, or a folder (local or bucket) of audio.

    A bad row does not stop the load: it is returned as a skip naming the metadata file, the
    line and the problem (no path or caption, a bad value, not UTF-8, not JSON). A folder is read
    through its ``metadata.jsonl`` / ``metadata.csv`` when it has one, else scanned for audio
    files (captions from the file and folder names, see `scan_folder`); in a scanned folder,
    files without an audio suffix are returned as skips too.

    Args:
        source: a metadata file or a folder, as a local path or fsspec URL.

    Returns:
        (tracks in file order with absolute paths, skips as {"path", "reason"} dicts).

    Raises:
        FileNotFoundError: `source` does not exist.
        StorageError: the store is unreachable, refuses the keys or lacks the bucket.
        ValueError: a file-level problem: a CSV header without ``path`` or ``caption``, a folder
            with no audio files, or a file that holds no rows at all.
    """
    from musiclora.storage import get_fs, storage_errors

    source = os.fspath(source)
    fs, root = get_fs(source)
    with storage_errors(source):
        if not fs.exists(root):
            raise FileNotFoundError(f"input not found: {source!r} (expected a metadata file or a folder of audio)")
        is_dir = fs.isdir(root)
        names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)} if is_dir else set()
    if not is_dir:
        rows = _read_metadata(source, lenient=True)
        return rows.tracks, rows.skipped
    for name in METADATA_NAMES:
        if name in names:
            sep = "" if source.endswith("/") else "/"
            return load_tracks(f"{source}{sep}{name}")
    tracks = scan_folder(source)
    local = isinstance(fs, LocalFileSystem)
    skipped = [
        {"path": os.path.abspath(p) if local else fs.unstrip_protocol(p),
         "reason": f"not an audio file (suffix {posixpath.splitext(p)[1] or 'none'!r}; expected one of {sorted(AUDIO_SUFFIXES)})"}
        for p in sorted(fs.find(root))
        if posixpath.splitext(p)[1].lower() not in AUDIO_SUFFIXES
    ]  # fmt: skip
    return tracks, skipped


def title_from_filename(path: str | os.PathLike) -> str:
    """Turn a file name into a title: "the_king_is_dead.ogg" -> "The King Is Dead"."""
    stem = posixpath.splitext(posixpath.basename(os.fspath(path).replace("\\", "/")))[0]
    words = re.sub(r"[_\-.]+", " ", stem).split()
    return " ".join(w[:1].upper() + w[1:] for w in words) or stem


def scan_folder(folder: str | os.PathLike) -> list[TrackMeta]:
    """List a folder of audio that has no metadata file, with captions made from file names.

    Files are found recursively by suffix (AUDIO_SUFFIXES). The caption is the title made from
    the file name, followed by the names of the sub-folders it sits in, which often name a genre
    or an album: ``jazz/cool/take_five.flac`` -> "Take Five, jazz, cool".

    Args:
        folder: local folder or fsspec URL of one.

    Returns:
        Tracks sorted by path; local paths absolute, remote ones as full URLs.

    Raises:
        NotADirectoryError: if `folder` is not a folder.
        ValueError: if it holds no audio files.
    """
    from musiclora.storage import get_fs

    source = os.fspath(folder)
    fs, root = get_fs(source)
    if not fs.isdir(root):
        raise NotADirectoryError(f"not a folder: {source!r}")
    local = isinstance(fs, LocalFileSystem)
    found = sorted(p for p in fs.find(root) if posixpath.splitext(p)[1].lower() in AUDIO_SUFFIXES)
    if not found:
        raise ValueError(f"{source}: no audio files found (looked for {sorted(AUDIO_SUFFIXES)})")
    root = root.rstrip("/")
    tracks = []
    for p in found:
        rel_dirs = posixpath.dirname(posixpath.relpath(p, root))
        parts = [title_from_filename(p)] + [d.replace("_", " ") for d in rel_dirs.split("/") if d]
        path = os.path.abspath(p) if local else fs.unstrip_protocol(p)
        tracks.append(TrackMeta(path=path, caption=", ".join(parts)))
    return tracks


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
