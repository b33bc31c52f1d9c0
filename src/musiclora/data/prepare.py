"""`musiclora prepare`: audio + metadata -> family features -> WebDataset shards + manifest.json.

Built on Ray Data, so it spreads over a cluster and runs as a Ray job (`ray_jobs/prepare.py`):

1. The driver reads the input leniently (`metadata.load_tracks`: a metadata file, or a folder or
   bucket of audio); bad rows become skips.
2. Encode (a pool of actors, each loading the family's encoder once; `tracks_per_task` tracks
   per batch): per track decode -> mono -> trim silence -> resample -> loudness-normalise ->
   optional augmented copies (pitch shift, time stretch, noise) -> segments (length, hop,
   minimum configurable) -> family features (EnCodec codes + melody chroma + caption for
   MusicGen-Melody), each sample serialised as its tar record. Every bad file (missing, corrupt,
   truncated, empty, not audio, silent, too short) becomes a skip with its reason; nothing stops
   the run.
3. Plan: the driver fetches only the small per-sample facts (split, track, order, size) and cuts
   the samples, in (split, track, segment) order, into shards of at most `samples_per_shard`
   samples and `target_shard_mb` MB. The plan does not depend on how tracks were batched or how
   many actors ran, so re-running on the same input and config reproduces the same shards
   byte for byte (tar headers carry no times or owners).
4. Write (grouped by shard, in parallel): each group's records are concatenated into
   `<split>-NNNNN.tar` at the output URL, with its sha256 and, per sample, its key and the byte
   offset of its first tar header (`offsets`, `keys`: what `data/indexed.py` seeks with).
5. The driver writes `manifest.json`: counts, seconds, throughput, feature spec, config, every
   shard with sha256, every skipped input with its reason.

Ray Data shows a progress bar per stage.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import logging
import math
import re
import time
from typing import Any

import numpy as np

from musiclora.audio import AudioDecodeError, is_silent, load_audio, preprocess, segment
from musiclora.config import PrepareConfig
from musiclora.data.analysis import retune_caption
from musiclora.data.augment import Augmentation, apply_augmentation, draw_augmentations
from musiclora.data.metadata import load_tracks
from musiclora.data.shards import MANIFEST, records_index, records_to_shard, sample_record
from musiclora.models.base import Segment
from musiclora.models.families import get_family
from musiclora.storage import ensure_bucket, get_fs, join_url, open_url, split_url

log = logging.getLogger(__name__)

ENCODE_BATCH = 8
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


def track_segments(track: dict[str, Any], cfg: PrepareConfig, sample_rate: int) -> tuple[list[Segment], float]:
    """The segments of one track (and of its augmented copies), ready for the family's encoder.

    Args:
        track: a metadata row (path, caption, optional genre/bpm/key/mood) plus `index`.
        cfg: the preparation config.
        sample_rate: the family's rate in Hz.

    Returns:
        (segments in (copy, start) order, keys `t<index>_<copy>_<start ms>`, each with caption
        and JSON metadata (source, start_s, duration_s, augmentation, key, bpm, ...);
        seconds of decoded input audio).

    Raises:
        FileNotFoundError, AudioDecodeError, StorageError: see `decode_track`.
        ValueError: silent, or shorter than `min_s` after trimming.
    """
    wav, sr = decode_track(track["path"])
    y = preprocess(wav, sr, sample_rate, trim_db=cfg.trim_db, target_lufs=cfg.loudness_lufs)
    if y.size == 0 or is_silent(y):
        raise ValueError("silent (RMS below -60 dBFS after trimming); expected audible music")
    min_s = min(cfg.min_s or cfg.segment_s, cfg.segment_s)
    if y.shape[-1] < min_s * sample_rate:
        raise ValueError(f"too short: {y.shape[-1] / sample_rate:.2f} s after trimming, min_s is {min_s} s")
    augs = draw_augmentations(
        track["path"], cfg.augment_copies, cfg.seed, cfg.pitch_shift_semitones, cfg.time_stretch, cfg.noise_snr_db
    )
    out: list[Segment] = []
    for aug in augs:
        z = y if aug.is_identity else apply_augmentation(y, sample_rate, aug, cfg.seed, track["path"])
        windows = [w for w in segment(z, sample_rate, cfg.segment_s, cfg.hop_s, min_s) if not is_silent(w.audio[: w.num_valid])]
        if cfg.max_segments_per_track:
            windows = windows[: cfg.max_segments_per_track]
        out += [_segment(track, aug, w, sample_rate) for w in windows]
    if not out:
        raise ValueError(f"no audible segment of at least min_s={min_s} s")
    return out, wav.shape[-1] / sr


def _segment(track: dict[str, Any], aug: Augmentation, w, sample_rate: int) -> Segment:
    meta = {k: track.get(k) for k in ("genre", "bpm", "key", "mood") if track.get(k) is not None}
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
        self.family = get_family(self.cfg.family)
        self.loaded = self.family.load(self.cfg.base)
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
            segs, input_s = track_segments(track, self.cfg, sr)
        except (AudioDecodeError, ValueError, OSError) as exc:
            reason = exc.reason if isinstance(exc, AudioDecodeError) else str(exc)
            return [_row("skip", track, reason=f"{type(exc).__name__}: {reason}")]
        rows = []
        for i in range(0, len(segs), ENCODE_BATCH):  # fixed chunks per track: the same on every run
            for j, sample in enumerate(self.family.encode_segments(self.loaded, segs[i : i + ENCODE_BATCH])):
                seg = segs[i + j]
                record = sample_record(sample)
                rows.append(_row("sample", track, order=i + j, key=seg.key, nbytes=len(record),
                                 seconds=seg.num_valid / sr, record=record))  # fmt: skip
        rows.append(_row("track", track, seconds=input_s, spec=self.spec))
        return rows


# --------------------------------------------------------------------------- stage 2: plan and write


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


def _assign(batch: dict[str, np.ndarray], starts: dict[str, list[tuple[int, int]]]) -> dict[str, Any]:
    keep = [i for i, kind in enumerate(batch["kind"]) if kind == "sample"]
    shards = []
    for i in keep:
        split = str(batch["split"][i])
        index = bisect.bisect_right(starts[split], (int(batch["track"][i]), int(batch["order"][i]))) - 1
        shards.append(shard_name(split, index))
    return {
        "shard": np.asarray(shards, dtype=str), "track": np.asarray([int(batch["track"][i]) for i in keep], dtype=np.int64),
        "order": np.asarray([int(batch["order"][i]) for i in keep], dtype=np.int64),
        "record": np.array([bytes(batch["record"][i]) for i in keep], dtype=object),
    }  # fmt: skip


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
    get_family(cfg.family)
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


def prepare(cfg: PrepareConfig, tracks_per_task: int = 4, concurrency: int = 1) -> dict[str, Any]:
    """Run the whole preparation on the current Ray cluster (starting a local one if none).

    Args:
        cfg: what to prepare (validated).
        tracks_per_task: tracks per Ray Data batch sent to an encoder actor.
        concurrency: encoder actors (each holds one copy of the model).

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
        ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / tracks_per_task)))
        encoded = ds.map_batches(
            EncodeTask, fn_constructor_kwargs={"cfg": cfg.model_dump()}, batch_size=tracks_per_task,
            concurrency=concurrency, batch_format="numpy",
        ).materialize()
        facts = encoded.select_columns([*_FACTS, "spec"]).take_all()
        target = int(cfg.target_shard_mb * 1e6) if cfg.target_shard_mb else None
        starts = plan_shards(facts, cfg.samples_per_shard, target)
        if starts:
            shards = (
                encoded.map_batches(_assign, fn_kwargs={"starts": starts}, batch_format="numpy")
                .groupby("shard", num_partitions=min(64, sum(len(v) for v in starts.values())))
                .map_groups(_write_group, fn_kwargs={"output_url": cfg.output_url}, batch_format="numpy")
                .take_all()
            )
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
