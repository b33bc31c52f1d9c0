"""Shards: reproducible writing, and the reader's split over ranks and real DataLoader worker
processes (each sample once, equal batch counts per rank, determinism, retries, skips)."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from musiclora.data import shards as shards_mod
from musiclora.data.shards import (
    MANIFEST,
    ShardStream,
    batches_forever,
    epoch_loader,
    load_manifest,
    sample_record,
    shard_counts,
    shard_urls,
    write_shard,
)


def _sample(key: str, value: int) -> dict:
    buf = io.BytesIO()
    np.save(buf, np.full((2, 3), value, dtype=np.int16), allow_pickle=False)
    return {"__key__": key, "codes.npy": buf.getvalue(), "json": {"caption": f"c{value}", "i": value}}


def make_shards(root, counts: list[int], manifest: bool = True) -> tuple[str, list[str]]:
    """Shards with the given sample counts under `root`; returns (folder URL, all keys)."""
    keys, entries, i = [], [], 0
    for s, n in enumerate(counts):
        samples = [_sample(f"s{s:02d}_{j:03d}", i + j) for j in range(n)]
        keys += [x["__key__"] for x in samples]
        i += n
        info = write_shard(str(root / f"train-{s:05d}.tar"), samples)
        entries.append({"name": f"train-{s:05d}.tar", "split": "train", "num_samples": n, "sha256": info["sha256"]})
    if manifest:
        (root / MANIFEST).write_text(json.dumps({"shards": entries}))
    return str(root), keys


def collate(samples):  # keeps keys and pad flags so tests can count them
    return [(s["__key__"], bool(s.get("__pad__"))) for s in samples]


def read_epoch(urls, world, workers, batch_size, seed=0, shuffle=0, epoch=0):
    """Per rank: the list of batches one epoch yields through a real DataLoader."""
    out = []
    for rank in range(world):
        stream = ShardStream(urls, rank=rank, world_size=world, seed=seed, shuffle_buffer=shuffle)
        stream.set_epoch(epoch)
        out.append(list(epoch_loader(stream, batch_size, collate, workers)))
    return out


# --------------------------------------------------------------------------- writing


def test_write_shard_is_reproducible_and_a_plain_tar(tmp_path):
    samples = [_sample("a", 1), _sample("b", 2)]
    one = write_shard(str(tmp_path / "one.tar"), samples)
    two = write_shard(str(tmp_path / "two.tar"), samples)
    assert one["sha256"] == two["sha256"] and one["num_samples"] == 2
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()
    with tarfile.open(tmp_path / "one.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["a.codes.npy", "a.json", "b.codes.npy", "b.json"]
    assert all(m.mtime == 0 and m.uname == "musiclora" and m.mode == 0o444 for m in members)


def test_webdataset_reads_our_shards(tmp_path):
    import webdataset as wds

    write_shard(str(tmp_path / "s.tar"), [_sample("a", 1), _sample("b", 2)])
    keys = [s["__key__"] for s in wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False)]
    assert keys == ["a", "b"]


@pytest.mark.parametrize("key", ["", "a.b", "a/b", "x" * 81, None])
def test_bad_sample_keys_are_rejected(key):
    with pytest.raises(ValueError, match="sample key"):
        sample_record({"__key__": key, "json": {}})


def test_manifest_errors_name_the_url(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `musiclora prepare` first"):
        load_manifest(str(tmp_path))
    (tmp_path / MANIFEST).write_text(json.dumps({"shards": [{"name": "v.tar", "split": "val", "num_samples": 3}]}))
    with pytest.raises(ValueError, match="no non-empty 'train' shards"):
        shard_urls(str(tmp_path))


def test_counts_come_from_the_manifest_or_from_reading(tmp_path):
    root, _ = make_shards(tmp_path, [3, 1, 2], manifest=False)
    urls = [f"{root}/train-{i:05d}.tar" for i in range(3)]
    assert shard_counts(urls) == [3, 1, 2]
    (tmp_path / MANIFEST).write_text(json.dumps({"shards": [{"name": "train-00000.tar", "num_samples": 9}]}))
    assert shard_counts(urls) == [9, 1, 2]  # the manifest wins where it has an entry


# --------------------------------------------------------------------------- the split


@pytest.mark.parametrize(
    ("counts", "world", "workers", "batch"),
    [
        ([5, 3, 7, 1, 4], 2, 2, 3),  # the 2 ranks x 2 workers
        ([5, 3, 7, 1, 4], 3, 2, 2),  # N = 20 not divisible by 3: pads
        ([6, 5], 2, 3, 2),  # fewer shards (2) than readers (6)
        ([1], 2, 2, 4),  # a single sample for 4 readers
    ],
)
def test_each_sample_once_and_equal_batches_per_rank(tmp_path, counts, world, workers, batch):
    root, keys = make_shards(tmp_path, counts)
    urls = shard_urls(root)
    per_rank = read_epoch(urls, world, workers, batch)
    real = [k for batches in per_rank for b in batches for k, pad in b if not pad]
    pads = [k for batches in per_rank for b in batches for k, pad in b if pad]
    assert Counter(real) == Counter(keys)  # every sample exactly once
    n = -(-len(keys) // world)
    assert len(pads) == world * n - len(keys) and set(pads) <= set(keys)
    stream = ShardStream(urls, world_size=world)
    expected = stream.batches_per_epoch(batch, workers)
    assert [len(b) for b in per_rank] == [expected] * world  # the same number of batches on every rank
    assert all(sum(len(b) for b in batches) == n for batches in per_rank)


def test_readers_open_only_the_shards_they_need(tmp_path):
    root, _ = make_shards(tmp_path, [4] * 8)
    opened = []
    stream = ShardStream(shard_urls(root), rank=1, world_size=4)
    real_open = shards_mod._open
    shards_mod._open = lambda url: (opened.append(url), real_open(url))[1]
    try:
        keys = [s["__key__"] for s in stream]
    finally:
        shards_mod._open = real_open
    assert len(keys) == 8 and sorted({u.rsplit("/", 1)[1] for u in opened}) == ["train-00002.tar", "train-00003.tar"]


def test_order_is_a_function_of_seed_and_epoch(tmp_path):
    root, keys = make_shards(tmp_path, [5, 3, 7, 1, 4])
    urls = shard_urls(root)

    def order(seed, epoch):
        return [k for batches in read_epoch(urls, 2, 2, 3, seed=seed, shuffle=4, epoch=epoch) for b in batches for k, _ in b]

    first = order(0, 0)
    assert first == order(0, 0)
    assert first != order(0, 1) and first != order(1, 0)
    assert sorted(first) != first  # shuffled
    assert Counter(k for k in order(0, 1)) == Counter(first)  # another epoch, the same samples
    unshuffled = [s["__key__"] for s in ShardStream(urls)]
    assert unshuffled == keys  # no shuffle buffer: manifest order


def test_batches_forever_keeps_ranks_in_step_across_epochs(tmp_path):
    root, keys = make_shards(tmp_path, [4, 3])
    urls = shard_urls(root)
    streams = [ShardStream(urls, rank=r, world_size=2, shuffle_buffer=2) for r in range(2)]
    per_epoch = streams[0].batches_per_epoch(2)
    its = [batches_forever(s, 2, collate) for s in streams]
    seen = [[next(it) for _ in range(3 * per_epoch)] for it in its]
    assert [s.epoch for s in streams] == [2, 2]
    epoch0 = [k for r in range(2) for b in seen[r][:per_epoch] for k, pad in b if not pad]
    assert Counter(epoch0) == Counter(keys)


# --------------------------------------------------------------------------- read errors


def test_transient_errors_are_retried_and_resume_where_they_stopped(tmp_path, monkeypatch):
    root, keys = make_shards(tmp_path, [5, 5])
    real_open = shards_mod._open
    failures = {"n": 0}

    class Flaky:
        """A shard stream that breaks after 2 samples' worth of bytes, twice."""

        def __init__(self, url):
            self.f = real_open(url)
            self.budget = 2 * 2048 if failures["n"] < 2 else None

        def read(self, n=-1):
            if self.budget is not None:
                if self.budget <= 0:
                    failures["n"] += 1
                    raise ConnectionError("connection reset by peer (simulated)")
                n = min(n if n >= 0 else self.budget, self.budget)
                self.budget -= n
            return self.f.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(shards_mod, "_open", Flaky)
    stream = ShardStream(shard_urls(root), retry_wait_s=0.01)
    got = [s["__key__"] for s in stream]
    assert got == keys  # nothing lost, nothing repeated
    assert stream.stats()["retries"] == 2 and stream.stats()["failed_shards"] == 0


def test_a_shard_that_keeps_failing_is_skipped_counted_and_padded(tmp_path):
    root, keys = make_shards(tmp_path, [4, 4, 4])
    (tmp_path / "train-00001.tar").write_bytes(b"this is not a tar file" * 50)
    urls = shard_urls(root)
    batches = []
    for rank in range(2):
        stream = ShardStream(urls, rank=rank, world_size=2, retries=2, retry_wait_s=0.01)
        batches.append(list(epoch_loader(stream, 2, collate, 0)))
        if rank == 0:
            stats = stream.stats()
    assert [len(b) for b in batches] == [3, 3]  # still in step
    real = [k for r in batches for b in r for k, pad in b if not pad]
    assert Counter(real) == Counter(k for k in keys if not k.startswith("s01"))
    assert stats == {"retries": 2, "failed_shards": 1, "lost_samples": 2, "padded_samples": 2}


def test_stats_are_shared_with_worker_processes(tmp_path):
    root, _ = make_shards(tmp_path, [3, 3])
    (tmp_path / "train-00000.tar").write_bytes(b"garbage")
    stream = ShardStream(shard_urls(root), retries=0)
    list(epoch_loader(stream, 1, collate, 2))
    assert stream.stats()["failed_shards"] == 1 and stream.stats()["lost_samples"] == 3


def test_constructor_errors():
    with pytest.raises(ValueError, match="no shard URLs"):
        ShardStream([])
    with pytest.raises(ValueError, match="rank 2 outside world_size 2"):
        ShardStream(["x.tar"], rank=2, world_size=2)
    with pytest.raises(ValueError, match="2 counts for 1 shard"):
        ShardStream(["x.tar"], num_samples=[1, 2])


def test_stream_survives_pickling_for_spawned_workers(tmp_path):
    root, keys = make_shards(tmp_path, [2, 2])
    stream = ShardStream(shard_urls(root))
    loader = torch.utils.data.DataLoader(
        stream, batch_size=1, collate_fn=collate, num_workers=1, multiprocessing_context="spawn"
    )
    assert [b[0][0] for b in loader] == keys
