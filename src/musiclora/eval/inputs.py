"""What an evaluation reads: the prompts (JSONL) and the reference music (audio folder or shards).

Prompts file, one JSON object a line (blank lines skipped, unknown keys rejected):

    {"prompt": "orchestral battle music", "seed": 3, "melody": "tunes/battle.wav", "melody_start_s": 12.0,
     "id": "battle"}

`prompt` is required; `seed` defaults to the line's index; `melody` (MusicGen-Melody) is an
audio path or URL, relative paths resolved against the prompts file's folder; `id` names the
prompt's files in the report (default `p000`, `p001`, ...).

Reference music is either audio files (a folder, scanned recursively, or one file) or a shards
folder written by `musiclora prepare` (a `manifest.json` beside the `.tar` shards). Shard samples
record their source track and offset (`source`, `start_s` in their JSON), so the reference is
the real audio of those segments, re-read and preprocessed exactly as `prepare` did; where a
source cannot be read, a `decode_codes` function (the family's codec) turns the sample's codes
back into audio instead.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from musiclora.audio import AudioDecodeError, is_silent, load_audio, preprocess, segment
from musiclora.storage import get_fs, join_url, open_url


@dataclass
class PromptSpec:
    """One evaluation prompt.

    Attributes:
        id: short name used for the prompt's files in the report (safe as a file name).
        text: the text prompt.
        seed: sampling seed; the base and the adapter use the same one.
        melody: optional float32 mono melody [L] at `melody_sample_rate` (MusicGen-Melody).
        melody_sample_rate: Hz of `melody`.
        melody_source: where the melody came from (path and offset), for the report.
    """

    id: str
    text: str
    seed: int = 0
    melody: np.ndarray | None = None
    melody_sample_rate: int | None = None
    melody_source: str | None = None


class _PromptRow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    seed: int | None = None
    melody: str | None = None
    melody_start_s: float = Field(0.0, ge=0)
    id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")


def _resolve(path: str, base: str) -> str:
    if "://" in path or os.path.isabs(path) or not base:
        return path
    return posixpath.join(base, path) if "://" in base else os.path.join(base, path)


def load_melody(path: str, start_s: float = 0.0, duration_s: float | None = None) -> tuple[np.ndarray, int]:
    """Read a melody clip: mono float32 [L] at its native rate, from `start_s` for `duration_s` seconds.

    Raises:
        FileNotFoundError / AudioDecodeError: the file is missing or not audio.
        ValueError: the clip is empty after `start_s`.
    """
    with open_url(path, "rb") as f:
        wav, sr = load_audio(f, name=path)
    mono = wav.mean(axis=0)
    start = round(start_s * sr)
    stop = None if duration_s is None else start + round(duration_s * sr)
    clip = mono[start:stop]
    if clip.size == 0:
        raise ValueError(
            f"melody {path}: nothing left after melody_start_s={start_s} (file is {mono.size / sr:.2f} s)"
        )
    return clip.astype(np.float32), int(sr)


def load_prompts(path: str | os.PathLike, duration_s: float | None = None) -> list[PromptSpec]:
    """Read a prompts JSONL file (format in the module docstring); melodies are loaded here.

    Args:
        path: local path or fsspec URL of the JSONL file.
        duration_s: melody length kept from `melody_start_s` (None: to the end of the file).

    Returns:
        The prompts in file order.

    Raises:
        FileNotFoundError: the file, or a melody file it names, does not exist.
        ValueError: bad JSON, an unknown or invalid key, duplicate ids, a melody that is not
            audio, or no prompt at all; the message names the file and line.
    """
    source = os.fspath(path)
    with open_url(source, "rb") as f:
        text = f.read().decode("utf-8")
    base = posixpath.dirname(source) if "://" in source else os.path.dirname(os.path.abspath(source))
    prompts: list[PromptSpec] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source}, line {lineno}"
        try:
            row = _PromptRow.model_validate(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'row'}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"{where}: {problems}") from None
        index = len(prompts)
        spec = PromptSpec(
            id=row.id or f"p{index:03d}", text=row.prompt, seed=index if row.seed is None else row.seed
        )
        if row.melody:
            melody_path = _resolve(row.melody, base)
            try:
                spec.melody, spec.melody_sample_rate = load_melody(
                    melody_path, row.melody_start_s, duration_s
                )
            except AudioDecodeError as exc:
                raise ValueError(f"{where}: melody {exc}") from exc
            spec.melody_source = f"{melody_path}@{row.melody_start_s:g}s"
        prompts.append(spec)
    check_prompts(prompts, source)
    return prompts


def check_prompts(prompts: list[PromptSpec], source: str = "prompts") -> None:
    """Raise ValueError if there are fewer than 2 prompts (KAD/FAD need 2 clips) or ids repeat."""
    if len(prompts) < 2:
        raise ValueError(f"{source}: {len(prompts)} prompt(s); KAD and FAD need at least 2 generated clips")
    seen: set[str] = set()
    for p in prompts:
        if p.id in seen:
            raise ValueError(f"{source}: prompt id {p.id!r} appears twice")
        seen.add(p.id)


@dataclass
class ReferenceSet:
    """Real music clips the generated sets are compared with.

    Attributes:
        wavs: float32 mono clips, each shape [L] with L = round(clip_s * sample_rate), whatever the
            family's channels (a stereo family's output is compared through its downmix).
        sample_rate: Hz of every clip.
        labels: where each clip came from ("<file>@<start>s").
        origin: what was read (the folder, file or shards URL and split).
        notes: how clips were obtained (e.g. how many shard samples were decoded from codes).
        captions: shards only: each clip's caption, as the shard sample holds it (empty for audio files).
    """

    wavs: list[np.ndarray]
    sample_rate: int
    labels: list[str]
    origin: str
    notes: dict[str, Any] = field(default_factory=dict)
    captions: list[str] = field(default_factory=list)


def _is_shards(source: str) -> bool:
    fs, path = get_fs(join_url(source, "manifest.json"))
    return fs.exists(path)


def _spread(items: list[Any], limit: int) -> list[Any]:
    """At most `limit` items, evenly spaced over the list (first and last kept)."""
    if len(items) <= limit:
        return items
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, limit).round()]


def _track_clips(path: str, sample_rate: int, clip_s: float) -> list[tuple[str, np.ndarray]]:
    with open_url(path, "rb") as f:
        wav, sr = load_audio(f, name=path)
    y = preprocess(wav, sr, sample_rate)
    return [
        (f"{posixpath.basename(path)}@{s.start / sample_rate:.1f}s", s.audio)
        for s in segment(y, sample_rate, clip_s)
        if not is_silent(s.audio)
    ]


def _audio_reference(source: str, sample_rate: int, clip_s: float, max_clips: int) -> ReferenceSet:
    from musiclora.data.metadata import AUDIO_SUFFIXES, scan_folder

    fs, root = get_fs(source)
    if fs.isdir(root):
        paths = [t.path for t in scan_folder(source)]
    elif posixpath.splitext(root)[1].lower() in AUDIO_SUFFIXES and fs.exists(root):
        paths = [source]
    else:
        raise FileNotFoundError(
            f"reference {source!r} is neither a shards folder (manifest.json), an audio folder nor an audio file"
        )
    per_track, skipped = [], []
    for path in paths:
        try:
            per_track.append(_track_clips(path, sample_rate, clip_s))
        except (AudioDecodeError, ValueError) as exc:
            skipped.append(f"{path}: {exc}")
    # round-robin over tracks so a few long tracks do not fill the set
    ordered = [
        t[i] for i in range(max((len(t) for t in per_track), default=0)) for t in per_track if i < len(t)
    ]
    chosen = ordered[:max_clips]
    if len(chosen) < 2:
        raise ValueError(f"reference {source}: {len(chosen)} usable clip(s) of {clip_s} s; need at least 2")
    return ReferenceSet(
        wavs=[c[1] for c in chosen],
        sample_rate=sample_rate,
        labels=[c[0] for c in chosen],
        origin=source,
        notes={"tracks": len(paths), "skipped": skipped},
    )


def _shard_reference(
    source: str,
    sample_rate: int,
    clip_s: float,
    max_clips: int,
    split: str | None,
    decode_codes: Callable[[np.ndarray], np.ndarray] | None,
) -> ReferenceSet:
    from musiclora.data.shards import ShardStream, load_manifest, shard_urls

    manifest = load_manifest(source)
    if split is None:
        split = "val" if manifest.get("num_samples", {}).get("val", 0) > 0 else "train"
    samples = [
        s
        for s in ShardStream(shard_urls(source, split, manifest))
        if s["json"].get("duration_s", clip_s) >= clip_s
    ]
    if len(samples) < 2:
        raise ValueError(
            f"reference {source} ({split}): {len(samples)} segment(s) of at least {clip_s} s; need 2"
        )
    n = round(clip_s * sample_rate)
    wavs, labels, captions, decoded, cache = [], [], [], 0, {}
    for s in _spread(samples, max_clips):
        meta, src = s["json"], s["json"].get("source")
        start = round(float(meta.get("start_s", 0.0)) * sample_rate)
        try:
            if src not in cache:
                cache.clear()  # samples of a track are adjacent: keep one decoded track
                with open_url(src, "rb") as f:
                    wav, sr = load_audio(f, name=src)
                cache[src] = preprocess(wav, sr, sample_rate)
            clip = cache[src][start : start + n]
            label = f"{posixpath.basename(src)}@{start / sample_rate:.1f}s"
        except (TypeError, OSError, AudioDecodeError, ValueError) as exc:
            if decode_codes is None or "codes.npy" not in s:
                raise ValueError(
                    f"reference {source}: cannot read source {src!r} of sample {s['__key__']} ({exc}) and the family "
                    "has no codec to decode its codes"
                ) from exc
            clip, decoded = decode_codes(s["codes.npy"])[:n], decoded + 1
            label = f"{s['__key__']} (decoded codes)"
        wavs.append(np.pad(clip, (0, n - clip.size)).astype(np.float32))
        labels.append(label)
        captions.append(str(meta.get("caption", "")))
    return ReferenceSet(
        wavs=wavs,
        sample_rate=sample_rate,
        labels=labels,
        origin=f"{source} ({split} split)",
        notes={"segments_in_split": len(samples), "decoded_from_codes": decoded},
        captions=captions,
    )


def load_reference(
    source: str | os.PathLike,
    sample_rate: int,
    clip_s: float,
    max_clips: int = 32,
    split: str | None = None,
    decode_codes: Callable[[np.ndarray], np.ndarray] | None = None,
) -> ReferenceSet:
    """Load reference clips of `clip_s` seconds from audio files or prepared shards.

    Audio goes through `musiclora.audio.preprocess` (mono, silence trim, resample,
    loudness normalisation: the `prepare` chain) and is cut into `clip_s` windows; silent
    windows are dropped; at most `max_clips` are kept, spread over tracks (audio: round-robin
    over tracks; shards: evenly spaced over the split's samples).

    Args:
        source: shards folder URL (holding manifest.json), audio folder, or audio file (path or URL).
        sample_rate: Hz to resample to (the family's, e.g. 32000).
        clip_s: clip length in seconds (the generated clips' length).
        max_clips: cap on the number of clips.
        split: shards split to read; None takes "val" when the manifest has one, else "train".
        decode_codes: shards only: int codes [K, T] -> float32 audio [L] at `sample_rate`, used
            when a sample's source audio cannot be read.

    Returns:
        The `ReferenceSet`.

    Raises:
        FileNotFoundError: `source` does not exist.
        ValueError: fewer than 2 usable clips, or an unreadable shard source with no decoder.
    """
    source = os.fspath(source)
    if clip_s <= 0 or max_clips < 2:
        raise ValueError(f"reference: clip_s must be > 0 and max_clips >= 2, got {clip_s} and {max_clips}")
    if _is_shards(source):
        return _shard_reference(source, sample_rate, clip_s, max_clips, split, decode_codes)
    return _audio_reference(source, sample_rate, clip_s, max_clips)
