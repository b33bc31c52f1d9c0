"""`musiclora prepare`: audio + metadata -> family features -> WebDataset shards + manifest.json.

Built on Ray Data, so it spreads over a cluster and runs as a Ray job (`ray_jobs/prepare.py`):

1. The driver reads the input leniently (`metadata.load_tracks`: a metadata file, or a folder or
   bucket of audio); bad rows become skips.
2. Encode (a pool of actors, each loading the family's encoder once, on a GPU in bf16 when the
   config gives them `encoder_gpus` and `encode_precision: bf16`; `tracks_per_task` tracks per
   batch, `encode_batch_size` segments per forward pass): per track decode -> the family's
   channels (`ModelFamily.channels`: mono, or stereo for Stable Audio Open) -> trim silence ->
   resample -> loudness-normalise ->
   optional augmented copies (pitch shift, time stretch, noise) -> segments (length, hop,
   minimum configurable) -> family features (EnCodec codes + melody chroma + caption for
   MusicGen-Melody), each sample serialised as its tar record. Every bad file (missing, corrupt,
   truncated, empty, not audio, silent, too short) becomes a skip with its reason; nothing stops
   the run.
3. Stream and write: the driver iterates the encoded records as the actors produce them
   (Ray Data's streaming executor, order preserved, so nothing waits in the object store for the
   whole corpus) and cuts them, per split in (track, segment) order, into shards of at most
   `samples_per_shard` samples and `target_shard_mb` MB (`plan_shards` is the same rule); each
   shard is written as `<split>-NNNNN.tar` (with its sha256) as soon as it closes, by a few
   writer threads, with per sample its key and the byte offset of its first tar header
   (`offsets`, `keys`: what `data/indexed.py` seeks with). The cut does not depend on how tracks were batched or how many actors ran, so
   re-running on the same input and config reproduces the same shards byte for byte (tar
   headers carry no times or owners).
4. Progress: Ray Data's bars per stage, and a line per written shard (tracks done, samples,
   audio seconds per second).
5. The driver writes `manifest.json`: counts, seconds, throughput, feature spec, config, every
   shard with sha256, every skipped input with its reason.

"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from musiclora.audio import AudioDecodeError, is_silent, leading_silence_s, load_audio, preprocess, segment
from musiclora.config import PrepareConfig
from musiclora.data.analysis import retune_caption
from musiclora.data.augment import Augmentation, apply_augmentation, draw_augmentations
from musiclora.data.metadata import load_tracks
from musiclora.data.shards import MANIFEST, records_index, records_to_shard, sample_record
from musiclora.models.base import Segment
from musiclora.models.families import get_family
from musiclora.storage import ensure_bucket, get_fs, join_url, open_url, split_url

log = logging.getLogger(__name__)

WRITER_THREADS = 4
FORMAT = "musiclora-shards/3"  # 3: per-shard member offsets and keys
_SHARD_NAME = re.compile(r"^(train|val)-\d{5}\.tar$")
_FACTS = ("kind", "split", "track", "order", "key", "nbytes", "seconds", "path", "reason")


def split_of(path: str, val_fraction: float, seed: int) -> str:
    """Deterministic train/val assignment of a track by a hash of its path (the same on every run)."""
    if val_fraction <= 0:
        return "train"
    h = int(hashlib.sha1(f"{seed}:{path}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if h < val_fraction else "train"


# --------------------------------------------------------------------------- one track


def decode_track(path: str) -> tuple[np.ndarray, int]:
    """Decode a local or remote audio file: float32 [C, L] and its sample rate in Hz.

    Raises:
        FileNotFoundError: the file (or object) does not exist (the message names it).
        AudioDecodeError: it is not decodable audio (see `audio.load_audio`).
        StorageError: the store is unreachable, refuses the keys or lacks the bucket.
    """
    if split_url(path)[0] == "file":
        return load_audio(split_url(path)[1], name=path)
    with open_url(path, "rb") as f:
        data = f.read()
    return load_audio(io.BytesIO(data), name=path)


def track_segments(
    track: dict[str, Any], cfg: PrepareConfig, sample_rate: int, channels: int = 1
) -> tuple[list[Segment], float]:
    """The segments of one track (and of its augmented copies), ready for the family's encoder.

    Args:
        track: a metadata row (path, caption, optional genre/bpm/key/mood) plus `index`.
        cfg: the preparation config.
        sample_rate: the family's rate in Hz.
        channels: the family's channel count (`ModelFamily.channels`): 1 mixes down to mono, 2
            keeps a stereo source's two channels and duplicates a mono one (`audio.to_channels`).

    Returns:
        (segments in (copy, start) order, keys `t<index>_<copy>_<start ms>`, each with caption
        and JSON metadata (source, start_s, duration_s, augmentation, key, bpm, ...), audio
        float32 [N] when `channels` is 1, else [channels, N];
        seconds of decoded input audio).

    Raises:
        FileNotFoundError, AudioDecodeError, StorageError: see `decode_track`.
        ValueError: silent, shorter than `min_s` after trimming, or a channel count that does not
            map to `channels` (see `audio.to_channels`).
    """
    wav, sr = decode_track(track["path"])
    y = preprocess(wav, sr, sample_rate, channels=channels, trim_db=cfg.trim_db, target_lufs=cfg.loudness_lufs)
    if y.size == 0 or is_silent(y):
        raise ValueError("silent (RMS below -60 dBFS after trimming); expected audible music")
    min_s = min(cfg.min_s or cfg.segment_s, cfg.segment_s)
    if y.shape[-1] < min_s * sample_rate:
        raise ValueError(f"too short: {y.shape[-1] / sample_rate:.2f} s after trimming, min_s is {min_s} s")
    offset_s = leading_silence_s(wav, sr, cfg.trim_db) if _paired_audio(track) else 0.0
    augs = draw_augmentations(
        track["path"], cfg.augment_copies, cfg.seed, cfg.pitch_shift_semitones, cfg.time_stretch, cfg.noise_snr_db
    )
    out: list[Segment] = []
    for aug in augs:
        z = y if aug.is_identity else apply_augmentation(y, sample_rate, aug, cfg.seed, track["path"])
        windows = [w for w in segment(z, sample_rate, cfg.segment_s, cfg.hop_s, min_s)
                   if not is_silent(w.audio[..., : w.num_valid])]  # [N] or [C, N]: the valid samples
        if cfg.max_segments_per_track:
            windows = windows[: cfg.max_segments_per_track]
        out += [_segment(track, aug, w, sample_rate, offset_s) for w in windows]
    if not out:
        raise ValueError(f"no audible segment of at least min_s={min_s} s")
    return out, wav.shape[-1] / sr


PAIRED_AUDIO = ("melody_path", "cond_audio")
"""Metadata columns naming a second file of the same track that conditions instead of the mix
(MusicGen-Melody's chroma, AudioLDM's CLAP audio embedding): a stem, a sung or hummed take."""


def _paired_audio(track: dict[str, Any]) -> bool:
    return any(track.get(k) for k in PAIRED_AUDIO)


def _segment(track: dict[str, Any], aug: Augmentation, w, sample_rate: int, offset_s: float = 0.0) -> Segment:
    meta = {k: track.get(k) for k in ("genre", "bpm", "key", "mood") if track.get(k) is not None}
    if aug.is_identity and _paired_audio(track):  # augmented copies condition on their own (changed) mix
        meta.update({k: track[k] for k in PAIRED_AUDIO if track.get(k)})
        meta["source_start_s"] = offset_s + w.start / sample_rate  # in the untrimmed file's time
    caption = track["caption"]
    if not aug.is_identity:
        caption = retune_caption(caption, track.get("key"), track.get("bpm"), aug.semitones, aug.rate)
        meta["augmentation"] = aug.describe()
        if meta.get("bpm"):
            meta["bpm"] = round(float(meta["bpm"]) * aug.rate, 1)
        if meta.get("key") and aug.semitones:
            from musiclora.data.analysis import transpose_key

            try:
                meta["key"] = transpose_key(meta["key"], aug.semitones)
            except ValueError:
                meta.pop("key")
    start_s = w.start / sample_rate
    return Segment(
        key=f"t{track['index']:06d}_{aug.copy}_{round(1000 * start_s):09d}", audio=w.audio, num_valid=w.num_valid,
        caption=caption,
        meta=dict(meta, source=track["path"], start_s=start_s, duration_s=w.num_valid / sample_rate),
    )


# --------------------------------------------------------------------------- stage 1: encode


def _columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Rows -> a numpy batch (bytes in an object column, so Arrow stores them as binary)."""
    out = {}
    for k in rows[0]:
        values = [r[k] for r in rows]
        out[k] = np.array(values, dtype=object) if isinstance(values[0], bytes) else np.asarray(values)
    return out


def _row(kind: str, track: dict[str, Any], **kw: Any) -> dict[str, Any]:
    row = {"kind": kind, "split": track["split"], "track": track["index"], "order": 0, "key": "", "nbytes": 0,
           "seconds": 0.0, "path": track["path"], "reason": "", "record": b"", "spec": ""}  # fmt: skip
    row.update(kw)
    return row


class EncodeTask:
    """Ray Data actor: loads the family's encoder once, turns batches of tracks into sample records.

    Output rows (one per sample, one per skipped track, one summary per encoded track):
    kind ("sample" | "skip" | "track"), split, track, order, key, nbytes, seconds (real audio in
    the sample; for "track" rows the decoded input's length), path, reason, record (the
    sample's tar bytes), spec (the feature spec JSON, on "track" rows).
    """

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = PrepareConfig.model_validate(cfg)
        self.family = get_family(self.cfg.family).configure(self.cfg.model_options)
        device, dtype = encoder_device(self.cfg)
        self.loaded = self.family.load(self.cfg.base, dtype=dtype)
        self.loaded.model.to(device)
        self.device = str(device)
        self.spec = json.dumps(self.family.feature_spec(self.loaded), sort_keys=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows: list[dict[str, Any]] = []
        for raw in batch["track"]:
            rows += self.encode_track(json.loads(raw))
        return _columns(rows)

    def encode_track(self, track: dict[str, Any]) -> list[dict[str, Any]]:
        """All rows for one track (see the class docstring); a bad track gives one "skip" row."""
        sr = self.family.sample_rate
        try:
            segs, input_s = track_segments(track, self.cfg, sr, self.family.channels)
        except (AudioDecodeError, ValueError, OSError) as exc:
            reason = exc.reason if isinstance(exc, AudioDecodeError) else str(exc)
            return [_row("skip", track, reason=f"{type(exc).__name__}: {reason}")]
        rows = []
        step = self.cfg.encode_batch_size
        for i in range(0, len(segs), step):  # fixed chunks per track: the same on every run
            for j, sample in enumerate(self.family.encode_segments(self.loaded, segs[i : i + step])):
                seg = segs[i + j]
                record = sample_record(sample)
                rows.append(_row("sample", track, order=i + j, key=seg.key, nbytes=len(record),
                                 seconds=seg.num_valid / sr, record=record))  # fmt: skip
        rows.append(_row("track", track, seconds=input_s, spec=self.spec))
        return rows


def encoder_device(cfg: PrepareConfig):
    """Where an encoder actor runs and in which dtype.

    Returns:
        (torch.device, torch.dtype): the actor's GPU when `encoder_gpus` > 0 and CUDA is visible
        (Ray sets CUDA_VISIBLE_DEVICES for the actor), with bfloat16 when `encode_precision` is
        `bf16`; else the CPU in float32 (bf16 on CPU is slow and changes nothing for storage).
    """
    import torch

    if cfg.encoder_gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16 if cfg.encode_precision == "bf16" else torch.float32
    return torch.device("cpu"), torch.float32


def encoder_resources(cfg: PrepareConfig) -> dict[str, float]:
    """Ray resources of one encoder actor: `num_cpus` and, when set, `num_gpus` (fractions share a GPU)."""
    out = {"num_cpus": cfg.encoder_cpus}
    if cfg.encoder_gpus:
        out["num_gpus"] = cfg.encoder_gpus
    return out


# --------------------------------------------------------------------------- stage 2: cut and write


def plan_shards(
    facts: list[dict[str, Any]], samples_per_shard: int, target_bytes: int | None = None
) -> dict[str, list[tuple[int, int]]]:
    """Cut the samples into shards: per split, the (track, order) of each shard's first sample.

    Samples are taken in (split, track, order) order; a shard closes when it holds
    `samples_per_shard` samples, or when the next sample would take it past `target_bytes`
    (the 1024-byte end-of-archive included; a lone oversized sample still gets a shard).

    Args:
        facts: sample rows with split, track, order and nbytes (other kinds are ignored).
        samples_per_shard: most samples per shard, >= 1.
        target_bytes: size cap per shard in bytes, or None.

    Returns:
        split -> sorted list of shard start positions; shard i of a split holds the samples from
        start i up to start i + 1.
    """
    samples = sorted((f["split"], f["track"], f["order"], f["nbytes"]) for f in facts if f["kind"] == "sample")
    starts: dict[str, list[tuple[int, int]]] = {}
    count, size, current = 0, 1024, None
    for split, track, order, nbytes in samples:
        full = count >= samples_per_shard or (target_bytes is not None and count and size + nbytes > target_bytes)
        if split != current or full:
            starts.setdefault(split, []).append((track, order))
            current, count, size = split, 0, 1024
        count += 1
        size += nbytes
    return starts


def shard_name(split: str, index: int) -> str:
    """File name of shard `index` of `split`: "train-00003.tar"."""
    return f"{split}-{index:05d}.tar"


class StreamingShards:
    """Cut samples arriving in (track, order) order into shards as `plan_shards` does, and write
    each shard (`_write_group`) on a writer thread as soon as it closes.

    Args:
        samples_per_shard: most samples per shard.
        target_bytes: size cap per shard in bytes, or None.
        output_url: where the `.tar` shards go.
        threads: writer threads (uploads overlap with encoding).
    """

    def __init__(self, samples_per_shard: int, target_bytes: int | None, output_url: str, threads: int = WRITER_THREADS):
        self.n, self.target, self.url = samples_per_shard, target_bytes, output_url
        self.open: dict[str, dict[str, Any]] = {}
        self.count: dict[str, int] = {}
        self.pool = ThreadPoolExecutor(max_workers=threads)
        self.futures: list[Future] = []

    def add(self, split: str, track: int, order: int, record: bytes) -> None:
        cur = self.open.get(split)
        full = cur is not None and (len(cur["record"]) >= self.n or (
            self.target is not None and cur["record"] and cur["size"] + len(record) > self.target))
        if cur is None or full:
            if cur is not None:
                self._close(split)
            index = self.count.get(split, 0)
            self.count[split] = index + 1
            cur = self.open[split] = {"shard": shard_name(split, index), "track": [], "order": [], "record": [],
                                      "size": 1024}
        cur["track"].append(track)
        cur["order"].append(order)
        cur["record"].append(record)
        cur["size"] += len(record)

    def _close(self, split: str) -> None:
        cur = self.open.pop(split)
        group = {"shard": np.asarray([cur["shard"]] * len(cur["record"])), "track": np.asarray(cur["track"]),
                 "order": np.asarray(cur["order"]), "record": np.array(cur["record"], dtype=object)}
        self.futures.append(self.pool.submit(_write_group, group, self.url))

    def written(self) -> int:
        return sum(f.done() for f in self.futures)

    def finish(self) -> list[dict[str, Any]]:
        """Close the open shards, wait for every write; returns one row per shard (name, split,
        num_samples, num_bytes, sha256). Raises what a write raised."""
        for split in list(self.open):
            self._close(split)
        try:
            return [{k: v[0] for k, v in f.result().items()} for f in self.futures]
        finally:
            self.pool.shutdown(wait=True)


def _write_group(group: dict[str, np.ndarray], output_url: str) -> dict[str, list]:
    order = sorted(range(len(group["shard"])), key=lambda i: (int(group["track"][i]), int(group["order"][i])))
    name = str(group["shard"][0])
    records = [bytes(group["record"][i]) for i in order]
    data = records_to_shard(records)
    with open_url(join_url(output_url, name), "wb") as f:
        f.write(data)
    return {"name": np.asarray([name]), "split": np.asarray([name.split("-")[0]]),
            "num_samples": np.asarray([len(order)]), "num_bytes": np.asarray([len(data)]),
            "sha256": np.asarray([hashlib.sha256(data).hexdigest()]),
            "index": np.asarray([json.dumps(records_index(records))])}  # fmt: skip


# --------------------------------------------------------------------------- the job


def _check(cfg: PrepareConfig) -> None:
    """Config mistakes that pydantic cannot see alone; raised before Ray starts."""
    get_family(cfg.family).configure(cfg.model_options)  # unknown family or bad options: fail before any work
    draw_augmentations("check", cfg.augment_copies, cfg.seed, cfg.pitch_shift_semitones, cfg.time_stretch, cfg.noise_snr_db)
    if cfg.min_s > cfg.segment_s:
        raise ValueError(f"prepare: min_s={cfg.min_s} must not exceed segment_s={cfg.segment_s}")


def _remove_stale_shards(output_url: str, keep: set[str]) -> None:
    """Delete `*.tar` files at the output left by an earlier run with a different plan."""
    fs, root = get_fs(output_url)
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return
    for name in names:
        if _SHARD_NAME.match(name) and name not in keep:
            fs.rm(f"{root}/{name}")


def prepare(cfg: PrepareConfig, tracks_per_task: int = 4, concurrency: int | None = None) -> dict[str, Any]:
    """Run the whole preparation on the current Ray cluster (starting a local one if none).

    Args:
        cfg: what to prepare (validated).
        tracks_per_task: tracks per Ray Data batch sent to an encoder actor.
        concurrency: encoder actors (each holds one copy of the model); None: `cfg.encoder_actors`.

    Returns:
        The manifest dict, also written to `<output_url>/manifest.json`.

    Raises:
        ValueError: unknown family, an inconsistent config, a file-level metadata problem, or no
            usable track at all (the first skip reasons are listed).
        FileNotFoundError: the input does not exist.
        StorageError: the store is unreachable, refuses the keys, or the input bucket is missing.
    """
    import ray

    _check(cfg)
    tracks, skipped = load_tracks(cfg.metadata)
    ensure_bucket(cfg.output_url)
    rows = []
    for index, t in enumerate(tracks):
        row = t.model_dump(mode="json")
        row.update(index=index, split=split_of(row["path"], cfg.val_fraction, cfg.seed))
        rows.append({"track": json.dumps(row)})
    start = time.time()
    ray.init(ignore_reinit_error=True, log_to_driver=True)
    shards: list[dict[str, Any]] = []
    facts: list[dict[str, Any]] = []
    if rows:
        facts, shards = _encode_and_write(cfg, rows, tracks_per_task, concurrency or cfg.encoder_actors, start)
    manifest = build_manifest(cfg, get_family(cfg.family).name, facts, skipped, shards, time.time() - start)
    if manifest["num_samples"]["train"] == 0:
        reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in manifest["skipped"][:10])
        raise ValueError(f"prepare: no usable training segment from {cfg.metadata} ({reasons})")
    _remove_stale_shards(cfg.output_url, {s["name"] for s in manifest["shards"]})
    with open_url(join_url(cfg.output_url, MANIFEST), "wb") as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))
    log.info(
        "prepare: %d tracks -> %d samples in %d shards, %d skipped, %.1f s of audio/s",
        manifest["num_tracks"], sum(manifest["num_samples"].values()), len(manifest["shards"]),
        manifest["num_skipped"], manifest["throughput"]["input_audio_s_per_s"],
    )  # fmt: skip
    return manifest


def _encode_and_write(cfg: PrepareConfig, rows: list[dict[str, str]], tracks_per_task: int, concurrency: int,
                      start: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Stream the encoder actors' output into shards; returns (facts, shard rows)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    preserve = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # records arrive in track order: the cut is deterministic
    target = int(cfg.target_shard_mb * 1e6) if cfg.target_shard_mb else None
    writer = StreamingShards(cfg.samples_per_shard, target, cfg.output_url)
    facts: list[dict[str, Any]] = []
    tracks = 0
    try:
        ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / tracks_per_task)))
        encoded = ds.map_batches(
            EncodeTask, fn_constructor_kwargs={"cfg": cfg.model_dump()}, batch_size=tracks_per_task,
            concurrency=concurrency, batch_format="numpy", **encoder_resources(cfg),
        )
        for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
            for i, kind in enumerate(batch["kind"]):
                facts.append({k: batch[k][i] for k in (*_FACTS, "spec")})
                if kind == "sample":
                    writer.add(str(batch["split"][i]), int(batch["track"][i]), int(batch["order"][i]),
                               bytes(batch["record"][i]))
                tracks += kind in ("track", "skip")
            audio_s = sum(float(f["seconds"]) for f in facts if f["kind"] == "track")
            print(f"[musiclora] prepare: {tracks}/{len(rows)} tracks encoded, "
                  f"{sum(f['kind'] == 'sample' for f in facts)} samples, {writer.written()} shards written, "
                  f"{audio_s / max(time.time() - start, 1e-9):.1f} s of audio/s", flush=True)
        shards = writer.finish()
    finally:
        ctx.execution_options.preserve_order = preserve
        writer.pool.shutdown(wait=False, cancel_futures=True)
    return facts, shards


def build_manifest(
    cfg: PrepareConfig,
    family: str,
    facts: list[dict[str, Any]],
    skipped: list[dict[str, str]],
    shards: list[dict[str, Any]],
    wall_s: float,
) -> dict[str, Any]:
    """The manifest.json content (see the module docstring); shards sorted by name, skips by path."""
    shards = sorted(({"name": str(s["name"]), "split": str(s["split"]), "num_samples": int(s["num_samples"]),
                      "num_bytes": int(s["num_bytes"]), "sha256": str(s["sha256"]),
                      **(json.loads(str(s["index"])) if "index" in s else {})} for s in shards),
                    key=lambda s: s["name"])  # fmt: skip
    facts = [{**f, "kind": str(f["kind"]), "seconds": float(f["seconds"]), "path": str(f["path"]),
              "reason": str(f["reason"])} for f in facts]  # fmt: skip
    skips = skipped + [{"path": f["path"], "reason": f["reason"]} for f in facts if f["kind"] == "skip"]
    skips = sorted(skips, key=lambda s: (s["path"], s["reason"]))
    samples = [f for f in facts if f["kind"] == "sample"]
    input_s = sum(f["seconds"] for f in facts if f["kind"] == "track")
    spec = next((json.loads(f["spec"]) for f in facts if f["kind"] == "track" and f["spec"]), {})
    return {
        "format": FORMAT,
        "family": family,
        "base": cfg.base,
        "feature_spec": spec,
        "config": cfg.model_dump(),
        "num_tracks": sum(1 for f in facts if f["kind"] == "track"),
        "num_skipped": len(skips),
        "skipped": skips,
        "num_samples": {split: sum(s["num_samples"] for s in shards if s["split"] == split) for split in ("train", "val")},
        "audio_seconds": round(sum(f["seconds"] for f in samples), 3),
        "input_audio_seconds": round(input_s, 3),
        "prepare_wall_s": round(wall_s, 3),
        "throughput": {"input_audio_s_per_s": round(input_s / wall_s, 3) if wall_s > 0 else 0.0},
        "shards": shards,
    }
