"""WebDataset shards: writing them reproducibly, streaming them back split by rank and worker.

Training reads through `data/indexed.py` instead (random access by member offsets, the global
order of `data/order.py`, exact resume); `ShardStream` below serves whole-epoch streaming
(evaluation inputs, benchmarks) and shards without a manifest.

A shard is a plain POSIX (ustar) tar of samples: `<key>.codes.npy`, `<key>.chroma.npy`,
`<key>.json`, ... in key order, every header with mtime 0 and owner `musiclora`, so the same
samples always give the same bytes (and sha256). The reader streams shards from any fsspec URL
(s3://, file://) with Python's streaming tar reader. Decoding is JSON and
`np.load(allow_pickle=False)` only: nothing is unpickled.

How one epoch is split (every "reader" is one (Ray Train rank, DataLoader worker) pair):

1. The epoch's sample sequence: the shards in an order drawn from (seed, epoch) (manifest order
   when shuffling is off), each shard's samples in file order; N samples in all, counts taken
   from `manifest.json`.
2. Ranks: each of the W ranks takes a contiguous run of n = ceil(N / W) positions. The W*n - N
   (< W) positions past the end wrap around to the start: those samples are read a second time
   and flagged `__pad__` (as torch's DistributedSampler pads), so every rank yields exactly n
   samples and so the same number of batches; uneven batch counts hang collective ops.
3. Workers: a rank's n positions are cut into ceil(n / batch_size) batch-sized blocks and each of
   its K DataLoader workers takes a contiguous run of blocks, so only the rank's last block can
   be a partial batch. The cut depends only on (n, K, batch_size), the same on every rank.
4. Each reader opens only the shards its positions fall in (several readers may share a shard
   when there are fewer shards than readers), skips to its first sample and streams; with a
   shuffle buffer, it then shuffles through a buffer drawn from (seed, epoch, rank, worker).

So every sample is read exactly once per epoch (plus the flagged pads), and the order is a pure
function of (seed, epoch, W, K, batch_size). A read error is retried with backoff (reopening the
shard and skipping what was already yielded); a shard that still fails is skipped, counted in
`ShardStream.stats()`, and its missing samples are replaced by flagged repeats of samples this
reader already yielded, so the rank still yields its n samples.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import math
import multiprocessing
import posixpath
import random
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from musiclora.storage import get_fs, join_url, open_url

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TAR_BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * TAR_BLOCK)
_STATS = ("retries", "failed_shards", "lost_samples", "padded_samples")

# --------------------------------------------------------------------------- writing


def _field_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"shard field of type {type(value).__name__}: expected bytes, str, dict or list")


def sample_record(sample: dict[str, Any]) -> bytes:
    """The tar members of one sample, without the end-of-archive marker.

    Records concatenate into a shard (`records_to_shard`), so samples can be encoded in one
    place and packed into shards in another.

    Args:
        sample: `__key__` (no "." or "/", at most 80 characters) and fields; `bytes` values are
            written as is, `dict`/`list` values as UTF-8 JSON (sorted keys), `str` as UTF-8.

    Returns:
        ustar bytes, a multiple of 512: per field (sorted by name) a header with mtime 0, mode
        0o444, owner and group `musiclora`, then the data zero-padded to 512.

    Raises:
        ValueError: a missing or malformed `__key__`.
        TypeError: a field of another type.
    """
    key = sample.get("__key__")
    if not isinstance(key, str) or not key or "." in key or "/" in key or len(key) > 80:
        raise ValueError(f"sample key {key!r}: expected a non-empty string without '.' or '/', <= 80 characters")
    out = bytearray()
    for name in sorted(k for k in sample if not k.startswith("__")):
        data = _field_bytes(sample[name])
        info = tarfile.TarInfo(f"{key}.{name}")
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        info.uname = info.gname = "musiclora"
        out += info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
        out += data + b"\0" * (-len(data) % TAR_BLOCK)
    return bytes(out)


def records_to_shard(records: list[bytes]) -> bytes:
    """Concatenate sample records (`sample_record`) into a complete tar (end-of-archive appended)."""
    return b"".join(records) + END_OF_ARCHIVE


def records_index(records: list[bytes]) -> dict[str, list]:
    """{"offsets", "keys"} of records concatenated into a shard, for the manifest's random access.

    `offsets` has len(records) + 1 byte offsets (sample i spans offsets[i]:offsets[i+1]; the
    last is where the end-of-archive marker starts); `keys` are the samples' `__key__`s.
    """
    offsets = [0]
    for r in records:
        offsets.append(offsets[-1] + len(r))
    return {"offsets": offsets, "keys": [r[:100].split(b"\0", 1)[0].decode("utf-8").partition(".")[0] for r in records]}


def write_records(url: str, records: list[bytes]) -> dict[str, Any]:
    """Write sample records as one shard at `url`.

    Returns:
        {"url", "num_samples", "num_bytes", "sha256", "offsets", "keys"} (see `records_index`).

    Raises:
        StorageError: see `musiclora.storage.open_url`.
    """
    data = records_to_shard(records)
    with open_url(url, "wb") as f:
        f.write(data)
    return {"url": url, "num_samples": len(records), "num_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            **records_index(records)}


def write_shard(url: str, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Write samples as one tar shard at `url`, byte-for-byte reproducible.

    Args:
        url: destination, e.g. `s3://bucket/shards/train-00000.tar`.
        samples: dicts with `__key__` and fields (see `sample_record`).

    Returns:
        {"url", "num_samples", "num_bytes", "sha256", "offsets", "keys"} of the written shard.
    """
    return write_records(url, [sample_record(s) for s in samples])


# --------------------------------------------------------------------------- manifest


def load_manifest(shards_url: str) -> dict[str, Any]:
    """Read `<shards_url>/manifest.json`.

    Raises:
        FileNotFoundError: no manifest there (names the URL; run `musiclora prepare` first).
        StorageError: the store is unreachable, refuses the keys or lacks the bucket.
    """
    url = join_url(shards_url, MANIFEST)
    try:
        with open_url(url, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError as exc:
        if type(exc) is not FileNotFoundError:  # BucketNotFoundError says more
            raise
        raise FileNotFoundError(f"no shards at {shards_url}: {url} does not exist (run `musiclora prepare` first)") from exc


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


def _split_dir(url: str) -> tuple[str, str]:
    head, _, name = url.rstrip("/").rpartition("/")
    return head, name


def shard_counts(urls: list[str]) -> list[int]:
    """Samples per shard, from the `manifest.json` beside the shards, else by reading the tars.

    Returns:
        One count per URL, in order.

    Raises:
        StorageError / FileNotFoundError: a shard without a manifest entry cannot be read.
    """
    counts: dict[str, int] = {}
    for folder in sorted({_split_dir(u)[0] for u in urls}):
        try:
            manifest = load_manifest(folder)
        except FileNotFoundError:
            continue
        counts.update({join_url(folder, s["name"]): int(s["num_samples"]) for s in manifest.get("shards", [])})
    out = []
    for url in urls:
        if url not in counts:
            with _open(url) as stream:
                counts[url] = sum(1 for _ in _iter_samples(stream, url))
        out.append(counts[url])
    return out


# --------------------------------------------------------------------------- reading


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Decode raw tar members: `.npy` via `np.load(allow_pickle=False)`, `json` via json; rest kept as bytes.

    Keys starting with `__` (`__key__`, `__url__`, `__pad__`) are copied as they are.
    """
    out: dict[str, Any] = {k: v for k, v in sample.items() if k.startswith("__")}
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


def _open(url: str):
    fs, path = get_fs(url)
    return fs.open(path, "rb")


def _iter_samples(stream, url: str) -> Iterator[dict[str, Any]]:
    """Raw samples of a tar stream: members grouped by key (the name up to its first '.')."""
    current: dict[str, Any] | None = None
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = posixpath.basename(member.name)
            key, _, field = base.partition(".")
            f = tar.extractfile(member)
            data = f.read() if f else b""
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            current[field] = data
    if current is not None:
        yield current


@dataclass(frozen=True)
class _Run:
    """`count` consecutive samples of shard `shard` starting at sample `first`; `pad` marks repeats."""

    shard: int
    first: int
    count: int
    pad: bool


def _positions_to_runs(start: int, stop: int, order: list[int], counts: list[int]) -> list[_Run]:
    """Map epoch positions [start, stop) (wrapping past the end) to runs over shards."""
    total = sum(counts[i] for i in order)
    offsets = np.cumsum([0] + [counts[i] for i in order])
    runs: list[_Run] = []
    pos = start
    while pos < stop:
        pad = pos >= total
        g = pos % total
        j = int(np.searchsorted(offsets, g, side="right")) - 1
        first = g - int(offsets[j])
        take = min(counts[order[j]] - first, stop - pos, total - g)
        runs.append(_Run(order[j], first, take, pad))
        pos += take
    return runs


class _Stats:
    """Read counters shared with DataLoader worker processes (a shared-memory array)."""

    def __init__(self) -> None:
        # a spawn-context lock travels to fork, forkserver and spawn workers alike
        self.array = multiprocessing.get_context("spawn").Array("q", len(_STATS))

    def add(self, name: str, value: int = 1) -> None:
        with self.array.get_lock():
            self.array[_STATS.index(name)] += value

    def as_dict(self) -> dict[str, int]:
        return dict(zip(_STATS, self.array[:], strict=True))

    def __getstate__(self):
        from multiprocessing.context import get_spawning_popen

        # Shared memory can only travel to a child being spawned; elsewhere (ray.put) start afresh.
        return {"array": self.array} if get_spawning_popen() is not None else {"array": None}

    def __setstate__(self, state) -> None:
        self.array = state["array"] if state["array"] is not None else multiprocessing.get_context("spawn").Array("q", len(_STATS))


class ShardStream(torch.utils.data.IterableDataset):
    """Stream decoded samples of one split, each sample once per epoch across all readers.

    See the module docstring for how an epoch is split over ranks and DataLoader workers.

    Args:
        urls: shard URLs (s3:// or file://), usually `shard_urls(...)`.
        rank / world_size: this Ray Train worker's rank and the number of workers.
        seed: the order is a function of (seed, epoch, world_size, workers, batch_size).
        shuffle_buffer: samples in the shuffle buffer; > 0 also shuffles the shard order per
            epoch; 0 reads in manifest order.
        num_samples: samples per shard (default: from the manifest beside the shards, else
            counted by reading them).
        batch_size: the batch size the stream is cut for (`batches_forever` sets it).
        retries: reopen attempts after a read error, per shard, before it is skipped.
        retry_wait_s: first wait between attempts; doubles each time, capped at 8 s.

    Raises:
        ValueError: no URLs, a rank outside the world, or counts that do not match the URLs.
    """

    def __init__(
        self,
        urls: list[str],
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 0,
        *,
        num_samples: list[int] | None = None,
        batch_size: int = 1,
        retries: int = 6,
        retry_wait_s: float = 0.5,
    ):
        if not urls:
            raise ValueError("ShardStream: no shard URLs")
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardStream: rank {rank} outside world_size {world_size}")
        if num_samples is not None and len(num_samples) != len(urls):
            raise ValueError(f"ShardStream: {len(num_samples)} counts for {len(urls)} shard URLs")
        self.urls, self.rank, self.world_size = list(urls), rank, world_size
        self.seed, self.shuffle_buffer, self.epoch = seed, shuffle_buffer, 0
        self.batch_size, self.retries, self.retry_wait_s = batch_size, retries, retry_wait_s
        self._counts = list(num_samples) if num_samples is not None else None
        self._stats = _Stats()

    # ---- the plan

    def set_epoch(self, epoch: int) -> None:
        """Select the pass whose order the next iteration follows."""
        self.epoch = epoch

    def counts(self) -> list[int]:
        """Samples per shard, in `urls` order (read once, then kept)."""
        if self._counts is None:
            self._counts = shard_counts(self.urls)
            if sum(self._counts) == 0:
                raise ValueError(f"ShardStream: the {len(self.urls)} shard(s) hold no samples")
        return self._counts

    def num_samples(self) -> int:
        """N, the samples in one epoch (all ranks together, pads not counted)."""
        return sum(self.counts())

    def samples_per_rank(self) -> int:
        """n = ceil(N / world_size), what every rank yields per epoch (pads included)."""
        return math.ceil(self.num_samples() / self.world_size)

    def worker_ranges(self, num_workers: int) -> list[tuple[int, int]]:
        """Each worker's [start, stop) positions within its rank's n, whole batches each."""
        n, b = self.samples_per_rank(), max(1, self.batch_size)
        blocks = math.ceil(n / b)
        cuts = [min(n, (w * blocks // num_workers) * b) for w in range(num_workers + 1)]
        return list(itertools.pairwise(cuts))

    def batches_per_epoch(self, batch_size: int, num_workers: int = 0) -> int:
        """Batches every rank yields per epoch when batched by `batch_size` (last one may be short)."""
        old, self.batch_size = self.batch_size, batch_size
        try:
            return sum(math.ceil((b - a) / batch_size) for a, b in self.worker_ranges(max(1, num_workers)))
        finally:
            self.batch_size = old

    def shard_order(self) -> list[int]:
        """Shard indices in this epoch's order (shuffled by (seed, epoch) when shuffling)."""
        order = list(range(len(self.urls)))
        if self.shuffle_buffer:
            random.Random(f"shards-{self.seed}-{self.epoch}").shuffle(order)
        return order

    def stats(self) -> dict[str, int]:
        """Read counters over all workers so far: retries, failed_shards, lost_samples, padded_samples."""
        return self._stats.as_dict()

    # ---- iteration

    def _worker(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = self._worker()
        counts, n = self.counts(), self.samples_per_rank()
        start, stop = self.worker_ranges(workers)[worker]
        runs = _positions_to_runs(self.rank * n + start, self.rank * n + stop, self.shard_order(), counts)
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
        samples = self._read_runs(runs)
        yield from _shuffled(samples, self.shuffle_buffer, rng) if self.shuffle_buffer else samples

    def _read_runs(self, runs: list[_Run]) -> Iterator[dict[str, Any]]:
        last: dict[str, Any] | None = None
        owed = 0  # samples lost to failed shards, repaid with flagged repeats
        for run in runs:
            for sample in self._read_run(run):
                if sample is None:
                    owed += 1
                    continue
                last = sample
                yield sample
                while owed:
                    owed -= 1
                    yield self._pad(last)
        if owed:
            last = last or self._any_sample(skip={r.shard for r in runs})
            for _ in range(owed):
                yield self._pad(last)

    def _any_sample(self, skip: set[int]) -> dict[str, Any]:
        """One sample from any other shard, to pad with when all of this reader's shards failed.

        Raises:
            RuntimeError: no shard at all can be read.
        """
        for index in [i for i in range(len(self.urls)) if i not in skip]:
            for sample in self._read_run(_Run(index, 0, 1, False)):
                if sample is not None:
                    return sample
        raise RuntimeError(
            f"rank {self.rank}: none of the {len(self.urls)} shard(s) could be read (first: {self.urls[0]}); "
            "see the warnings above"
        )

    def _pad(self, sample: dict[str, Any]) -> dict[str, Any]:
        self._stats.add("padded_samples")
        return {**sample, "__pad__": True}

    def _read_run(self, run: _Run) -> Iterator[dict[str, Any] | None]:
        """Decoded samples of one run; None for each sample lost when the shard keeps failing."""
        url, done, attempt = self.urls[run.shard], 0, 0
        while done < run.count:
            try:
                with _open(url) as stream:
                    for j, raw in enumerate(_iter_samples(stream, url)):
                        if j < run.first + done:
                            continue
                        sample = decode_sample(raw)
                        if run.pad:
                            self._stats.add("padded_samples")
                            sample["__pad__"] = True
                        done += 1
                        yield sample
                        if done == run.count:
                            return
                raise EOFError(f"{url} ended after {run.first + done} samples, the manifest promised more")
            except Exception as exc:  # noqa: BLE001 - any read failure is retried, then the shard skipped
                if attempt >= self.retries:
                    log.warning("skipping the rest of shard %s after %d attempts: %r", url, attempt + 1, exc)
                    self._stats.add("failed_shards")
                    self._stats.add("lost_samples", run.count - done)
                    for _ in range(run.count - done):
                        yield None
                    return
                wait = min(8.0, self.retry_wait_s * 2**attempt)
                log.info("read error on %s (%r); retry %d in %.1f s", url, exc, attempt + 1, wait)
                self._stats.add("retries")
                attempt += 1
                time.sleep(wait)


def _shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    buf: list[Any] = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            yield buf.pop(rng.randrange(len(buf)))
    rng.shuffle(buf)
    yield from buf


def epoch_loader(stream: ShardStream, batch_size: int, collate: Callable, loader_workers: int = 0):
    """A DataLoader over one epoch of `stream` (call `stream.set_epoch` first).

    Every rank gets `stream.batches_per_epoch(batch_size, loader_workers)` batches; only the
    last may hold fewer than `batch_size` samples.
    """
    stream.batch_size = batch_size
    stream.counts()  # read the counts once, before the workers fork
    return torch.utils.data.DataLoader(
        stream, batch_size=batch_size, collate_fn=collate, num_workers=loader_workers, drop_last=False
    )


def batches_forever(stream: ShardStream, batch_size: int, collate, loader_workers: int = 0) -> Iterator[Any]:
    """Endless iterator of collated batches; each pass over the stream is a new epoch.

    Every rank yields the same number of batches per epoch (see the module docstring), so ranks
    that each draw one batch per step stay in step (uneven batch counts would hang DeepSpeed's
    collectives).

    Raises:
        RuntimeError: a full pass produced no batch for this rank.
    """
    epoch = 0
    while True:
        stream.set_epoch(epoch)
        produced = 0
        for batch in epoch_loader(stream, batch_size, collate, loader_workers):
            produced += 1
            yield batch
        if produced == 0:
            raise RuntimeError(
                f"rank {stream.rank}: a pass over {len(stream.urls)} shard(s) gave no batch of {batch_size}; "
                "prepare more data or lower data.batch_size"
            )
        epoch += 1
