"""`musiclora prepare`: audio + metadata -> family features -> WebDataset shards + manifest.json.

Built on Ray Data so it spreads over a cluster: tracks are batched (`tracks_per_task` each) to a
pool of actors; each actor loads the family's encoder once, then per track decodes -> mono ->
trims silence -> resamples -> loudness-normalises -> cuts fixed segments -> encodes, and writes its
own shards straight to the output URL. The driver only gathers the small per-task summaries and
writes `manifest.json` (counts, seconds, shards with sha256, every skipped input with its reason).
Bad files never stop the run: each is skipped, named and counted.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any

import numpy as np

from musiclora.config import PrepareConfig
from musiclora.data.audio import AudioDecodeError, is_silent, load_audio, preprocess, segment
from musiclora.data.metadata import load_metadata
from musiclora.data.shards import MANIFEST, write_shard
from musiclora.models.base import Segment
from musiclora.models.registry import get_family
from musiclora.storage import ensure_bucket, join_url, open_url

ENCODE_BATCH = 8


def split_of(path: str, val_fraction: float, seed: int) -> str:
    """Deterministic train/val assignment of a track by a hash of its path (the same on every run)."""
    if val_fraction <= 0:
        return "train"
    h = int(hashlib.sha1(f"{seed}:{path}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if h < val_fraction else "train"


class ShardTask:
    """Ray Data actor: loads the family's encoder once, turns batches of tracks into shards."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = PrepareConfig.model_validate(cfg)
        self.family = get_family(self.cfg.family)
        self.loaded = self.family.load(self.cfg.base)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        tracks = [json.loads(r) for r in batch["track"]]
        result: dict[str, Any] = {"shards": [], "skipped": [], "tracks": 0, "segments": 0, "seconds": 0.0}
        per_split: dict[str, list[Segment]] = {"train": [], "val": []}
        for track in tracks:
            try:
                segs = self._segments(track)
            except (AudioDecodeError, ValueError, OSError) as exc:
                result["skipped"].append({"path": track["path"], "reason": str(exc)})
                continue
            result["tracks"] += 1
            result["segments"] += len(segs)
            result["seconds"] += sum(s.num_valid for s in segs) / self.family.sample_rate
            per_split[track["split"]].extend(segs)
        first = tracks[0]["index"] if tracks else 0
        for split, segs in per_split.items():
            result["shards"] += self._write(split, first, segs)
        result["feature_spec"] = self.family.feature_spec(self.loaded)
        return {"result": [json.dumps(result)]}

    def _segments(self, track: dict[str, Any]) -> list[Segment]:
        with open_url(track["path"], "rb") as f:
            wav, sr = load_audio(f, name=track["path"])
        cfg = self.cfg
        y = preprocess(wav, sr, self.family.sample_rate)
        if y.size == 0 or is_silent(y):
            raise ValueError(f"{track['path']}: silent after trimming (expected audible music)")
        windows = segment(y, self.family.sample_rate, cfg.segment_s, cfg.hop_s, min(cfg.min_s or cfg.segment_s, cfg.segment_s))
        windows = [w for w in windows if not is_silent(w.audio[: w.num_valid])]
        if cfg.max_segments_per_track:
            windows = windows[: cfg.max_segments_per_track]
        if not windows:
            raise ValueError(f"{track['path']}: shorter than min_s={cfg.min_s} s after trimming")
        meta = {k: track.get(k) for k in ("genre", "bpm", "key", "mood") if track.get(k) is not None}
        return [
            Segment(
                key=f"t{track['index']:05d}_{int(1000 * w.start / self.family.sample_rate):08d}",
                audio=w.audio, num_valid=w.num_valid, caption=track["caption"],
                meta=dict(meta, source=track["path"], start_s=w.start / self.family.sample_rate,
                          duration_s=w.num_valid / self.family.sample_rate),
            )
            for w in windows
        ]

    def _write(self, split: str, first: int, segs: list[Segment]) -> list[dict[str, Any]]:
        samples: list[dict[str, Any]] = []
        for i in range(0, len(segs), ENCODE_BATCH):
            samples += self.family.encode_segments(self.loaded, segs[i : i + ENCODE_BATCH])
        per = self.cfg.samples_per_shard
        shards = []
        for j in range(math.ceil(len(samples) / per)):
            name = f"{split}-{first:05d}-{j:03d}.tar"
            info = write_shard(join_url(self.cfg.output_url, name), samples[j * per : (j + 1) * per])
            shards.append({"name": name, "split": split, **{k: v for k, v in info.items() if k != "url"}})
        return shards


def prepare(cfg: PrepareConfig, tracks_per_task: int = 4, concurrency: int = 1) -> dict[str, Any]:
    """Run the whole preparation on the current Ray cluster (starting a local one if none).

    Args:
        cfg: what to prepare (validated).
        tracks_per_task: tracks per Ray Data batch; each batch writes its own shard(s).
        concurrency: encoder actors (each holds one copy of the model).

    Returns:
        The manifest dict, also written to `<output_url>/manifest.json`.

    Raises:
        ValueError: unknown family, or no usable track at all (every skip reason is listed).
        StorageError: the output URL cannot be written.
    """
    import ray

    family = get_family(cfg.family)
    tracks = load_metadata(cfg.metadata)
    ensure_bucket(cfg.output_url)
    rows = []
    for index, t in enumerate(tracks):
        row = t.model_dump(mode="json")
        row.update(index=index, split=split_of(row["path"], cfg.val_fraction, cfg.seed))
        rows.append({"track": json.dumps(row)})
    start = time.time()
    ray.init(ignore_reinit_error=True, log_to_driver=True)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / tracks_per_task)))
    results = ds.map_batches(
        ShardTask, fn_constructor_kwargs={"cfg": cfg.model_dump()}, batch_size=tracks_per_task,
        concurrency=concurrency, batch_format="numpy",
    ).take_all()
    parts = [json.loads(r["result"]) for r in results]
    manifest = _manifest(cfg, family.name, parts, time.time() - start)
    if manifest["num_samples"]["train"] == 0:
        reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in manifest["skipped"][:10])
        raise ValueError(f"prepare: no usable training segment from {cfg.metadata} ({reasons})")
    with open_url(join_url(cfg.output_url, MANIFEST), "wb") as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))
    return manifest


def _manifest(cfg: PrepareConfig, family: str, parts: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    shards = sorted((s for p in parts for s in p["shards"]), key=lambda s: s["name"])
    skipped = sorted((s for p in parts for s in p["skipped"]), key=lambda s: s["path"])
    seconds = sum(p["seconds"] for p in parts)
    spec = next((p["feature_spec"] for p in parts if p.get("feature_spec")), {})
    return {
        "format": "musiclora-shards/1",
        "family": family,
        "base": cfg.base,
        "feature_spec": spec,
        "config": cfg.model_dump(),
        "num_tracks": sum(p["tracks"] for p in parts),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "num_samples": {
            split: sum(s["num_samples"] for s in shards if s["split"] == split) for split in ("train", "val")
        },
        "audio_seconds": round(seconds, 3),
        "prepare_wall_s": round(wall_s, 3),
        "shards": shards,
    }
