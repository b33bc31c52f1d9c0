"""Random access into shards: ranged reads of exactly one sample's members, retries that resume at
the failed member, old manifests without offsets, and the global batches of a resumed run."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

from musiclora.data.indexed import GlobalBatches, ShardIndex, global_batches, shards_digest
from musiclora.data.order import sample_ids
from musiclora.data.shards import MANIFEST, load_manifest, write_shard

from .test_shards import _sample


def make_indexed(root, counts: list[int], offsets: bool = True) -> tuple[str, list[str]]:
    """Shards + a manifest carrying (or, for an old manifest, lacking) member offsets and keys."""
    keys, entries, i = [], [], 0
    for s, n in enumerate(counts):
        samples = [_sample(f"s{s:02d}_{j:03d}", i + j) for j in range(n)]
        keys += [x["__key__"] for x in samples]
        i += n
        info = write_shard(str(root / f"train-{s:05d}.tar"), samples)
        entry = {"name": f"train-{s:05d}.tar", "split": "train", "num_samples": n, "num_bytes": info["num_bytes"],
                 "sha256": info["sha256"]}
        if offsets:
            entry.update(offsets=info["offsets"], keys=info["keys"])
        entries.append(entry)
    (root / MANIFEST).write_text(json.dumps({"shards": entries}))
    return str(root), keys


@pytest.mark.parametrize("offsets", [True, False])
def test_read_returns_the_samples_by_global_id(tmp_path, offsets):
    root, keys = make_indexed(tmp_path, [3, 5, 4], offsets=offsets)
    index = ShardIndex(root)
    ids = [11, 0, 4, 3, 7]
    got = index.read(ids)
    assert [s["__key__"] for s in got] == [keys[i] for i in ids]
    assert [s["__index__"] for s in got] == ids
    assert [int(s["json"]["i"]) for s in got] == ids and got[0]["codes.npy"].dtype == np.int16


def test_a_sample_is_read_without_the_shard_prefix(tmp_path):
    """Bytes read equal the sample's own members: the last sample of a shard costs one sample."""
    root, _ = make_indexed(tmp_path, [50])
    index = ShardIndex(root)
    offsets = load_manifest(root)["shards"][0]["offsets"]
    index.read([49])
    assert index.bytes_read == offsets[50] - offsets[49] and index.ranged_reads == 1
    index.read(list(range(50)))
    shard_bytes = (tmp_path / "train-00000.tar").stat().st_size
    assert index.bytes_read - (offsets[50] - offsets[49]) == offsets[50] <= shard_bytes


def test_a_retry_resumes_at_the_member_that_failed(tmp_path):
    """Shard 1 vanishes for a moment: shard 0's members are not read again, shard 1's are."""
    root, keys = make_indexed(tmp_path, [4, 4])
    index = ShardIndex(root, retries=8, retry_wait_s=0.05)
    lost = tmp_path / "train-00001.tar"
    hidden = tmp_path / "hidden.tar"
    shutil.move(lost, hidden)
    threading.Timer(0.3, lambda: shutil.move(hidden, lost)).start()
    got = index.read([0, 1, 5, 6])
    assert [s["__key__"] for s in got] == [keys[i] for i in (0, 1, 5, 6)]
    assert index.retry_count >= 1
    assert index.ranged_reads == 4  # every member read exactly once successfully


def test_a_member_that_stays_unreadable_names_the_shard(tmp_path):
    root, _ = make_indexed(tmp_path, [2, 2])
    index = ShardIndex(root, retries=1, retry_wait_s=0.01)
    (tmp_path / "train-00001.tar").unlink()
    with pytest.raises(OSError, match="train-00001.tar"):
        index.read([3])


def test_a_shard_rewritten_after_the_manifest_is_refused(tmp_path):
    root, _ = make_indexed(tmp_path, [3])
    write_shard(str(tmp_path / "train-00000.tar"), [_sample(f"x{j}", j) for j in range(3)])
    with pytest.raises(ValueError, match="shard changed"):
        ShardIndex(root).read([1])


def test_offsets_that_do_not_fit_the_count_are_refused(tmp_path):
    root, _ = make_indexed(tmp_path, [3])
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["shards"][0]["offsets"] = manifest["shards"][0]["offsets"][:-1]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="3 offsets for 3 samples"):
        ShardIndex(root)


def test_the_digest_names_the_shards(tmp_path):
    root, _ = make_indexed(tmp_path, [3, 2])
    manifest = load_manifest(root)
    changed = json.loads(json.dumps(manifest))
    changed["shards"][1]["sha256"] = "0" * 64
    assert shards_digest(manifest) == ShardIndex(root).digest != shards_digest(changed)


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_global_batches_follow_the_order_whatever_the_loader_workers(tmp_path, workers):
    root, keys = make_indexed(tmp_path, [5, 6, 7])
    index = ShardIndex(root)
    n, b, world, position = 18, 2, 2, 30
    for rank in range(world):
        it = global_batches(index, rank, world, b, 4, position, lambda s: [x["__key__"] for x in s], workers)
        items = [next(it) for _ in range(7)]
        for k, item in enumerate(items):
            expect = sample_ids(position + k * world * b + rank * b, b, n, 4)
            assert item["ids"].tolist() == expect.tolist()
            assert item["batch"] == [keys[i] for i in expect]


def test_global_batches_check_their_rank():
    with pytest.raises(ValueError, match="rank 3 outside"):
        GlobalBatches(None, 3, 2, 1, 0)


def test_a_store_outage_during_a_batch_is_ridden_out(tmp_path):
    """All shards unreachable for ~0.5 s while a batch is read: it arrives complete and in order."""
    root, keys = make_indexed(tmp_path, [4, 4, 4])
    index = ShardIndex(root, retries=10, retry_wait_s=0.05)
    away = tmp_path.parent / (tmp_path.name + "-away")
    shutil.move(tmp_path, away)
    threading.Timer(0.5, lambda: shutil.move(away, tmp_path)).start()
    got = index.read(list(range(12)))
    assert [s["__key__"] for s in got] == keys
    assert index.retry_count >= 1
