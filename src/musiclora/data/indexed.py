"""Random access into WebDataset shards: per-member byte offsets and ranged reads through fsspec.

`musiclora prepare` records, for every shard in `manifest.json`, the byte offset where each
sample's first tar header starts (`offsets`, one more entry than samples: the last is where
the end-of-archive marker starts) and the sample keys (`keys`). A sample is then one ranged
read, `fs.cat_ranges([path], [start], [end])` (s3fs issues them concurrently), of exactly its
own tar members: no shard prefix is read and discarded, and a retry re-reads only the members
that failed. Manifests written before offsets existed still work: the first use of such a shard
reads it once, from its start, to build its offsets (logged; re-run `musiclora prepare` to
avoid it).

`GlobalBatches` streams one rank's training batches in the global order of `data/order.py`
from a stream position, so a resumed run continues at the next unseen sample whatever its
number of ranks or DataLoader workers. Only JSON and `np.load(allow_pickle=False)` decode
data: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import tarfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from musiclora.data.order import rank_ids
from musiclora.data.shards import _iter_samples, _open, decode_sample, load_manifest
from musiclora.storage import get_fs, join_url

log = logging.getLogger(__name__)


def shards_digest(manifest: dict[str, Any], split: str = "train") -> str:
    """sha256 (hex) of one split's shard list (name, samples, bytes, sha256): what a data position refers to."""
    shards = [[s["name"], s["num_samples"], s.get("num_bytes"), s.get("sha256")]
              for s in manifest["shards"] if s["split"] == split and s["num_samples"] > 0]
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest()


def index_tar(url: str) -> tuple[list[int], list[str]]:
    """Offsets and keys of a shard without an index, by reading it once from the start.

    Returns:
        (offsets, keys) as `musiclora prepare` records them.
    """
    offsets, keys, end = [], [], 0
    with _open(url) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            key = member.name.rsplit("/", 1)[-1].partition(".")[0]
            if not keys or keys[-1] != key:
                keys.append(key)
                offsets.append(member.offset)
            end = member.offset_data + -(-member.size // 512) * 512
    return offsets + [end], keys


class ShardIndex:
    """Where every sample of one split lives: shard URL and byte range, by global sample id.

    Global ids number the split's samples in manifest order (shard by shard, members in file order).

    Args:
        shards_url: the folder holding `manifest.json`.
        split: "train" or "val".
        manifest: the parsed manifest (read from `shards_url` when None).
        retries: ranged-read attempts after a failure, per batch, before giving up.
        retry_wait_s: first wait between attempts; doubles each time, capped at 8 s (the default
            10 retries ride out about 55 s of object-store outage).

    Raises:
        ValueError: the split has no samples, or offsets that do not match a shard's count.
    """

    def __init__(self, shards_url: str, split: str = "train", manifest: dict[str, Any] | None = None, *,
                 retries: int = 10, retry_wait_s: float = 0.5):
        manifest = manifest or load_manifest(shards_url)
        shards = [s for s in manifest["shards"] if s["split"] == split and s["num_samples"] > 0]
        if not shards:
            raise ValueError(f"{shards_url}: manifest has no non-empty {split!r} shards")
        self.urls = [join_url(shards_url, s["name"]) for s in shards]
        self.counts = [int(s["num_samples"]) for s in shards]
        self.starts = np.cumsum([0] + self.counts)
        self._offsets = {i: (list(s["offsets"]), list(s.get("keys") or [])) for i, s in enumerate(shards) if "offsets" in s}
        for i, (offsets, _) in self._offsets.items():
            if len(offsets) != self.counts[i] + 1:
                raise ValueError(f"{self.urls[i]}: manifest lists {len(offsets)} offsets for {self.counts[i]} samples "
                                 f"(expected {self.counts[i] + 1})")
        self.digest = shards_digest(manifest, split)
        self.retries, self.retry_wait_s = retries, retry_wait_s
        self.bytes_read = self.ranged_reads = self.retry_count = 0

    @property
    def num_samples(self) -> int:
        """N, the samples of the split."""
        return int(self.starts[-1])

    def locate(self, sample_id: int) -> tuple[int, int]:
        """(shard index, member index) of a global sample id.

        Raises:
            IndexError: an id outside [0, N).
        """
        if not 0 <= sample_id < self.num_samples:
            raise IndexError(f"sample id {sample_id} outside [0, {self.num_samples})")
        shard = int(np.searchsorted(self.starts, sample_id, side="right")) - 1
        return shard, int(sample_id - self.starts[shard])

    def _shard_index(self, shard: int) -> tuple[list[int], list[str]]:
        if shard not in self._offsets:
            log.warning("%s has no offsets in its manifest (written before offsets existed): reading it once "
                        "to index it; re-run `musiclora prepare` to avoid this", self.urls[shard])
            self._offsets[shard] = index_tar(self.urls[shard])
        return self._offsets[shard]

    def read(self, ids: list[int] | np.ndarray) -> list[dict[str, Any]]:
        """Decoded samples for global ids, in order, each with `__key__`, `__url__` and `__index__`.

        Raises:
            OSError: a member still unreadable after `retries` attempts (names the shard).
            ValueError: a member whose key differs from the manifest's (the shards changed).
        """
        where = [self.locate(int(i)) for i in ids]
        ranges = []
        for shard, member in where:
            offsets, _ = self._shard_index(shard)
            ranges.append((self.urls[shard], offsets[member], offsets[member + 1]))
        out = []
        for (shard, member), data, sample_id in zip(where, self._read_ranges(ranges), ids, strict=True):
            raw = next(_iter_samples(io.BytesIO(data), self.urls[shard]))
            keys = self._offsets[shard][1]
            if keys and raw["__key__"] != keys[member]:
                raise ValueError(f"{self.urls[shard]}: member {member} is {raw['__key__']!r}, the manifest says "
                                 f"{keys[member]!r}: the shard changed after the manifest was written")
            out.append({**decode_sample(raw), "__index__": int(sample_id)})
        return out

    def _read_ranges(self, ranges: list[tuple[str, int, int]]) -> list[bytes]:
        """Bytes of each (url, start, end); failed ranges are retried with backoff, the rest kept."""
        results: list[bytes | None] = [None] * len(ranges)
        pending, attempt = list(range(len(ranges))), 0
        while True:
            fs, _ = get_fs(ranges[pending[0]][0])
            paths = [get_fs(ranges[i][0])[1] for i in pending]
            try:
                got = fs.cat_ranges(paths, [ranges[i][1] for i in pending], [ranges[i][2] for i in pending],
                                    on_error="return")
            except Exception as exc:  # noqa: BLE001 - the whole call failed: every range is retried
                got = [exc] * len(pending)
            failed = []
            for i, data in zip(pending, got, strict=True):
                url, start, end = ranges[i]
                if isinstance(data, bytes) and len(data) == end - start:
                    results[i] = data
                    self.bytes_read += len(data)
                    self.ranged_reads += 1
                else:
                    failed.append((i, data))
            if not failed:
                return results  # type: ignore[return-value]
            if attempt >= self.retries:
                url, start, end = ranges[failed[0][0]]
                raise OSError(f"cannot read bytes {start}-{end} of {url} after {attempt + 1} attempts: {failed[0][1]!r}")
            wait = min(8.0, self.retry_wait_s * 2**attempt)
            log.info("%d ranged read(s) failed (%r); retry %d in %.1f s", len(failed), failed[0][1], attempt + 1, wait)
            self.retry_count += 1
            attempt += 1
            pending = [i for i, _ in failed]
            time.sleep(wait)


class GlobalBatches(torch.utils.data.IterableDataset):
    """One rank's endless training batches in the global order, from a stream position.

    Item k (k = 0, 1, ...) is the rank's slice of global batch k after `position`
    (`data.order.rank_ids`): {"ids": int64 [batch_size] global sample ids, "batch": collate(samples)}.
    With K DataLoader workers, worker w yields items w, w+K, ...; the DataLoader returns them
    round-robin, so the order does not depend on K.

    Args:
        index: the training split's `ShardIndex`.
        rank / world_size: this rank and the number of ranks.
        batch_size: samples per rank per item.
        seed: the data seed of `data.order`.
        position: samples consumed by all ranks before the first item.
        shuffle: False reads in manifest order.
        collate: samples -> batch (default: the list of samples).
    """

    def __init__(self, index: ShardIndex, rank: int, world_size: int, batch_size: int, seed: int, position: int = 0,
                 shuffle: bool = True, collate: Callable | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"GlobalBatches: rank {rank} outside world_size {world_size}")
        self.index, self.rank, self.world_size, self.batch_size = index, rank, world_size, batch_size
        self.seed, self.position, self.shuffle, self.collate = seed, position, shuffle, collate

    def ids(self, k: int) -> np.ndarray:
        """The global ids of item k."""
        return rank_ids(self.position, k, self.batch_size, self.world_size, self.rank, self.index.num_samples,
                        self.seed, self.shuffle)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for k in itertools.count(worker, workers):
            ids = self.ids(k)
            samples = self.index.read(ids)
            yield {"ids": torch.as_tensor(ids), "batch": self.collate(samples) if self.collate else samples}


def global_batches(index: ShardIndex, rank: int, world_size: int, batch_size: int, seed: int, position: int,
                   collate: Callable, loader_workers: int = 0, shuffle: bool = True) -> Iterator[dict[str, Any]]:
    """Iterator over `GlobalBatches` items through a DataLoader with `loader_workers` processes."""
    dataset = GlobalBatches(index, rank, world_size, batch_size, seed, position, shuffle, collate)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=loader_workers)
    return iter(loader)
