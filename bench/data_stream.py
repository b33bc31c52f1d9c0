"""Data-path throughput: streaming shards from the object store vs local disk, and `prepare`.

    .venv/bin/python bench/data_stream.py [--samples 512] [--prepare-tracks 4] [--no-prepare]

Prints one JSON object:

- `stream`: for each source (`local`, `s3` = the embedded SeaweedFS store on loopback) and
  DataLoader worker count, samples/s and MB/s (shard bytes / wall time) of a full epoch of
  `ShardStream` + `epoch_loader`, over synthetic shards shaped like MusicGen-Melody's (30 s:
  codes int16 [4, 1500], chroma uint8 [235, 12], caption JSON).
- `resume`: a 100k-sample manifest (`--resume-samples`, small synthetic samples, 100 per
  shard) in the store; a run resuming deep into its second epoch: seconds to the first batch
  (manifest + index load + the batch's ranged reads; target <= 2 s), distinct shards per batch
  of 16, and bytes read per sample over the sample's own size (no shard prefix re-read: 1.0,
  target <= 1.05), through `ShardIndex` + `global_batches`.
- `prepare`: a real corpus (`--corpus`, first `--prepare-tracks` tracks) through `prepare` on
  a local Ray cluster into the store: seconds of input audio per wall second for the whole job
  (Ray Data start-up included) and for the encode step alone in one process (decode, resample,
  loudness, segment, tiny EnCodec + chroma), which is what more actors multiply.

Everything it starts (store, Ray head) runs on 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from musiclora.data.indexed import ShardIndex, global_batches
from musiclora.data.shards import (
    ShardStream,
    epoch_loader,
    records_index,
    records_to_shard,
    sample_record,
    write_shard,
)
from musiclora.storage import ensure_bucket, get_fs, join_url, open_url
from musiclora.store import EmbeddedStore, find_free_s3_port


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def write_synthetic(url: str, samples: int, per_shard: int) -> tuple[list[str], int]:
    """MusicGen-Melody-shaped shards at `url`; returns (shard URLs, total bytes)."""
    rng = np.random.default_rng(0)
    urls, total, entries = [], 0, []
    for s in range(0, samples, per_shard):
        batch = [
            {"__key__": f"t{i:06d}_0_000000000", "codes.npy": _npy(rng.integers(0, 2048, (4, 1500), dtype=np.int16)),
             "chroma.npy": _npy(np.eye(12, dtype=np.uint8)[rng.integers(0, 12, 235)]),
             "json": {"caption": f"synthetic sample {i}", "num_frames": 1500}}
            for i in range(s, min(samples, s + per_shard))
        ]  # fmt: skip
        name = f"train-{s // per_shard:05d}.tar"
        info = write_shard(join_url(url, name), batch)
        urls.append(info["url"])
        total += info["num_bytes"]
        entries.append({"name": name, "split": "train", "num_samples": len(batch), "sha256": info["sha256"]})
    with open_url(join_url(url, "manifest.json"), "wb") as f:
        f.write(json.dumps({"shards": entries}).encode())
    return urls, total


def time_epoch(urls: list[str], total_bytes: int, workers: int, batch_size: int = 8) -> dict:
    stream = ShardStream(urls, shuffle_buffer=64)
    t0 = time.perf_counter()
    n = sum(len(b) for b in epoch_loader(stream, batch_size, lambda s: s, workers))
    wall = time.perf_counter() - t0
    return {"workers": workers, "samples": n, "wall_s": round(wall, 3), "samples_per_s": round(n / wall, 1),
            "mb_per_s": round(total_bytes / 1e6 / wall, 2)}  # fmt: skip


def write_big_manifest(url: str, samples: int, per_shard: int) -> None:
    """`samples` small samples in shards of `per_shard` at `url` (every shard the same bytes, to write fast)."""
    records = [sample_record({"__key__": f"k{j:05d}", "codes.npy": _npy(np.full((4, 16), j, dtype=np.int16)),
                              "json": {"caption": f"synthetic {j}"}}) for j in range(per_shard)]
    data, index = records_to_shard(records), records_index(records)
    fs, root = get_fs(url)
    entries = []
    for s in range(samples // per_shard):
        name = f"train-{s:05d}.tar"
        fs.pipe_file(f"{root}/{name}", data)
        entries.append({"name": name, "split": "train", "num_samples": per_shard, "num_bytes": len(data), **index})
    with open_url(join_url(url, "manifest.json"), "wb") as f:
        f.write(json.dumps({"shards": entries}).encode())


def bench_resume(url: str, samples: int, batch_size: int = 16, batches: int = 20) -> dict:
    """Resume deep into epoch 1 (position 1.73 N) of a `samples`-sample manifest; see the module docstring."""
    per_shard = 100
    write_big_manifest(url, samples, per_shard)
    t0 = time.perf_counter()
    index = ShardIndex(url)
    it = global_batches(index, rank=0, world_size=1, batch_size=batch_size, seed=0, position=int(1.73 * samples),
                        collate=lambda s: s)
    first = next(it)
    first_s = time.perf_counter() - t0
    items = [first] + [next(it) for _ in range(batches - 1)]
    distinct = [len({int(i) // per_shard for i in item["ids"]}) for item in items]
    offsets = index._offsets[0][0]
    own = sum(offsets[int(i) % per_shard + 1] - offsets[int(i) % per_shard] for item in items for i in item["ids"])
    return {"manifest_samples": index.num_samples, "shards": len(index.urls), "resume_position": int(1.73 * samples),
            "time_to_first_batch_s": round(first_s, 3), "batch_size": batch_size,
            "distinct_shards_per_batch": round(sum(distinct) / len(distinct), 2),
            "bytes_read_over_sample_bytes": round(index.bytes_read / own, 4),
            "ranged_reads_per_sample": round(index.ranged_reads / (batch_size * batches), 3)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_prepare(store: EmbeddedStore, work: Path, corpus: str, tracks: int) -> dict:
    from musiclora.config import PrepareConfig
    from musiclora.data.corpus import build_corpus
    from musiclora.data.metadata import load_tracks
    from musiclora.data.prepare import EncodeTask, prepare, split_of
    from musiclora.local_ray import LocalRay

    info = build_corpus(corpus, cache_dir=REPO / ".musiclora" / "cache" / "corpus", max_tracks=tracks)
    cfg = PrepareConfig(base="tiny", metadata=str(info.metadata_path), output_url="s3://bench/prepared",
                        segment_s=10.0, min_s=4.0, samples_per_shard=16)  # fmt: skip
    task = EncodeTask(cfg.model_dump())
    t0, input_s = time.perf_counter(), 0.0
    for i, t in enumerate(load_tracks(cfg.metadata)[0]):
        row = dict(t.model_dump(mode="json"), index=i, split=split_of(t.path, 0.0, 0))
        input_s += sum(r["seconds"] for r in task.encode_track(row) if r["kind"] == "track")
    encode_wall = time.perf_counter() - t0
    head = LocalRay(work / "ray", gcs_port=_free_port(), dashboard_port=_free_port(), num_cpus=2)
    try:
        head.start(extra_env={**store.env(), "PYTHONPATH": str(REPO / "src"), "TOKENIZERS_PARALLELISM": "false"})
        os.environ.update({k: v for k, v in head.env().items() if k != "RAY_ADDRESS"})
        import ray  # after the auth variables: Ray reads them when it is imported

        ray.init(address=head.address, log_to_driver=False)
        t0 = time.perf_counter()
        manifest = prepare(cfg, tracks_per_task=1, concurrency=2)
        wall = time.perf_counter() - t0
    finally:
        if "ray" in sys.modules:
            sys.modules["ray"].shutdown()
        head.stop()
    return {
        "corpus": corpus, "tracks": manifest["num_tracks"], "samples": sum(manifest["num_samples"].values()),
        "input_audio_s": manifest["input_audio_seconds"], "job_wall_s": round(wall, 2),
        "job_audio_s_per_s": round(manifest["input_audio_seconds"] / wall, 2),
        "encode_only_audio_s_per_s": round(input_s / encode_wall, 2), "encode_actors": 2,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--per-shard", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--corpus", default="demo")
    parser.add_argument("--prepare-tracks", type=int, default=3)
    parser.add_argument("--no-prepare", action="store_true")
    parser.add_argument("--resume-samples", type=int, default=100_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="musiclora-bench-") as tmp:
        work = Path(tmp)
        store = EmbeddedStore(work / "store", s3_port=find_free_s3_port())
        store.start()
        try:
            os.environ.update(store.env())
            ensure_bucket("s3://bench")
            out: dict = {"machine": {"cpus": os.cpu_count()}, "stream": {}}
            for source, url in (("local", str(work / "local")), ("s3", "s3://bench/shards")):
                urls, total = write_synthetic(url, args.samples, args.per_shard)
                out["stream"][source] = [time_epoch(urls, total, w) for w in args.workers]
                out["stream"][source + "_shard_mb"] = round(total / 1e6 / len(urls), 2)
            ensure_bucket("s3://bench-resume")
            out["resume"] = bench_resume("s3://bench-resume/shards", args.resume_samples)
            if not args.no_prepare:
                out["prepare"] = bench_prepare(store, work, args.corpus, args.prepare_tracks)
        finally:
            store.stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
