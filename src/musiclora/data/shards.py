"""WebDataset shards: writing them reproducibly, streaming them back split by rank and worker.

A shard is a plain POSIX tar of samples (`<key>.codes.npy`, `<key>.chroma.npy`, `<key>.json`,
...). The reader streams shards straight from any fsspec URL (s3://, file://) through webdataset's
tar iterators. Decoding is JSON and `np.load(allow_pickle=False)` only: nothing is unpickled.

Splitting: each (Ray Train rank, DataLoader worker) pair is one "reader". With at least as many
shards as readers, reader i takes shards i, i + R, i + 2R, ... (R readers). With fewer shards
than readers, every reader opens every shard and keeps samples j with j % R == i. Either way every
sample is read by exactly one reader per pass.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from musiclora.storage import get_fs, join_url, open_url

MANIFEST = "manifest.json"


def write_shard(url: str, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Write samples as one tar shard at `url`, byte-for-byte reproducible (mtime 0, fixed owner).

    Args:
        url: destination, e.g. `s3://bucket/shards/train-00000-000.tar`.
        samples: dicts with `__key__` and fields; `bytes` values are written as is, `dict` values
            as UTF-8 JSON.

    Returns:
        {"url", "num_samples", "num_bytes", "sha256"} of the written shard.
    """
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0.0, user="musiclora", group="musiclora") as sink:
        for sample in samples:
            sink.write({k: _field_bytes(v) if k != "__key__" else v for k, v in sample.items()})
    data = buf.getvalue()
    with open_url(url, "wb") as f:
        f.write(data)
    return {"url": url, "num_samples": len(samples), "num_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _field_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"shard field of type {type(value).__name__}: expected bytes, str, dict or list")


def load_manifest(shards_url: str) -> dict[str, Any]:
    """Read `<shards_url>/manifest.json`.

    Raises:
        FileNotFoundError: no manifest there (names the URL; run `musiclora prepare` first).
    """
    url = join_url(shards_url, MANIFEST)
    fs, path = get_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"no shards at {shards_url}: {url} does not exist (run `musiclora prepare` first)")
    with open_url(url, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def shard_urls(shards_url: str, split: str = "train", manifest: dict[str, Any] | None = None) -> list[str]:
    """The shard URLs of one split, in manifest order.

    Raises:
        ValueError: the manifest lists no shard for `split`.
    """
    manifest = manifest or load_manifest(shards_url)
    names = [s["name"] for s in manifest["shards"] if s["split"] == split and s["num_samples"] > 0]
    if not names:
        raise ValueError(f"{shards_url}: manifest has no non-empty {split!r} shards")
    return [join_url(shards_url, n) for n in names]


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Decode raw tar members: `.npy` via `np.load(allow_pickle=False)`, `json` via json; rest kept as bytes."""
    out: dict[str, Any] = {"__key__": sample["__key__"], "__url__": sample.get("__url__")}
    for key, value in sample.items():
        if key.startswith("__"):
            continue
        if key.endswith(".npy"):
            out[key] = np.load(io.BytesIO(value), allow_pickle=False)
        elif key == "json" or key.endswith(".json"):
            out[key] = json.loads(value.decode("utf-8"))
        else:
            out[key] = value
    return out


def _open_streams(urls: Iterator[str]) -> Iterator[dict[str, Any]]:
    for url in urls:
        fs, path = get_fs(url)
        with fs.open(path, "rb") as stream:
            yield {"url": url, "stream": stream}


class ShardStream(torch.utils.data.IterableDataset):
    """Stream decoded samples of one split, each sample exactly once per pass across all readers.

    Args:
        urls: shard URLs (s3:// or file://).
        rank / world_size: this Ray Train worker's rank and the number of workers.
        seed: shuffle seed; the order is a function of (seed, epoch, reader).
        shuffle_buffer: samples in the shuffle buffer (0: file order).
        epoch: pass number, set with `set_epoch` before each pass.
    """

    def __init__(self, urls: list[str], rank: int = 0, world_size: int = 1, seed: int = 0, shuffle_buffer: int = 0):
        if not urls:
            raise ValueError("ShardStream: no shard URLs")
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardStream: rank {rank} outside world_size {world_size}")
        self.urls, self.rank, self.world_size = list(urls), rank, world_size
        self.seed, self.shuffle_buffer, self.epoch = seed, shuffle_buffer, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _reader(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader, readers = self._reader()
        by_shard = len(self.urls) >= readers
        urls = self.urls[reader::readers] if by_shard else self.urls
        rng = random.Random(f"{self.seed}-{self.epoch}-{reader}")
        if self.shuffle_buffer:
            urls = rng.sample(urls, len(urls))
        samples = group_by_keys(tar_file_expander(_open_streams(iter(urls))))
        if not by_shard:
            samples = (s for j, s in enumerate(samples) if j % readers == reader)
        decoded = (decode_sample(s) for s in samples)
        yield from _shuffled(decoded, self.shuffle_buffer, rng) if self.shuffle_buffer else decoded


def _shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    buf: list[Any] = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            yield buf.pop(rng.randrange(len(buf)))
    rng.shuffle(buf)
    yield from buf


def batches_forever(stream: ShardStream, batch_size: int, collate, loader_workers: int = 0) -> Iterator[Any]:
    """Endless iterator of collated batches; each pass over the stream is a new epoch.

    Every rank draws as many batches as its loop asks for, so all ranks take the same number of
    steps (uneven batch counts would hang DeepSpeed's collectives). A pass that yields no batch
    (fewer samples than `batch_size` on this rank) raises instead of spinning.

    Raises:
        RuntimeError: a full pass produced no batch for this rank.
    """
    epoch = 0
    while True:
        stream.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            stream, batch_size=batch_size, collate_fn=collate, num_workers=loader_workers, drop_last=True
        )
        produced = 0
        for batch in loader:
            produced += 1
            yield batch
        if produced == 0:
            raise RuntimeError(
                f"rank {stream.rank}: a pass over {len(stream.urls)} shard(s) gave no batch of {batch_size}; "
                "prepare more data or lower data.batch_size"
            )
        epoch += 1
