"""The shard reader survives an object-store restart in the middle of an epoch.

A dedicated SeaweedFS store (not the session's, which other tests share) is stopped after part
of the epoch has been read and started again on the same data dir and port a few seconds
later (longer than s3fs retries by itself), while the reader keeps asking for samples: its retries must carry it across, with every
sample delivered exactly once.
"""

from __future__ import annotations

import threading
import time

import pytest

from musiclora.data.shards import ShardStream, shard_urls, write_shard
from musiclora.storage import ensure_bucket, join_url, open_url
from musiclora.store import EmbeddedStore, find_free_s3_port

pytestmark = pytest.mark.integration


@pytest.fixture
def own_store(tmp_path, monkeypatch):
    store = EmbeddedStore(tmp_path / "store", s3_port=find_free_s3_port(), access_key="rk", secret_key="rs")
    store.start(timeout_s=60)
    for name, value in store.env().items():
        monkeypatch.setenv(name, value)
    try:
        yield store
    finally:
        store.stop()


def _samples(shard: int, n: int) -> list[dict]:
    return [{"__key__": f"s{shard}_{j}", "json": {"shard": shard, "j": j}, "pad.bin": b"x" * 2000} for j in range(n)]


def test_reader_survives_a_store_restart_mid_epoch(own_store):
    import json

    url = "s3://restart/shards"
    ensure_bucket(url)
    entries, keys = [], []
    for s in range(6):
        samples = _samples(s, 5)
        keys += [x["__key__"] for x in samples]
        info = write_shard(join_url(url, f"train-{s:05d}.tar"), samples)
        entries.append({"name": f"train-{s:05d}.tar", "split": "train", "num_samples": 5, "sha256": info["sha256"]})
    with open_url(join_url(url, "manifest.json"), "wb") as f:
        f.write(json.dumps({"shards": entries}).encode())

    stream = ShardStream(shard_urls(url), retries=8, retry_wait_s=0.25)
    it = iter(stream)
    got = [next(it)["__key__"] for _ in range(7)]  # into the second shard

    own_store.stop()
    restarting = threading.Event()

    def restart_later():
        time.sleep(8.0)  # longer than s3fs's own retries, so the reader's must carry it
        restarting.set()  # before start(): the reader may finish while start() still polls for readiness
        own_store.start(timeout_s=60)

    thread = threading.Thread(target=restart_later, daemon=True)
    thread.start()
    got += [s["__key__"] for s in it]  # blocks in retries until the store is back
    finished_after_restart = restarting.is_set()  # shards 3-6 can only come from the restarted store
    thread.join(timeout=90)

    assert finished_after_restart
    assert not thread.is_alive()  # the store came back within start()'s timeout
    assert got == keys  # each sample exactly once, in order
    stats = stream.stats()  # who retried (s3fs inside, or the reader) depends on timing; nothing may be lost
    assert stats["failed_shards"] == 0 and stats["padded_samples"] == 0


def test_indexed_reader_rides_out_a_30_s_store_outage(own_store):
    """The training reader (ranged reads) asks for a batch while the store is down for 30 s: the
    batch arrives complete, in order, each member read once successfully."""
    import json

    from musiclora.data.indexed import ShardIndex

    url = "s3://outage/shards"
    ensure_bucket(url)
    entries, keys = [], []
    for s in range(4):
        samples = _samples(s, 5)
        keys += [x["__key__"] for x in samples]
        info = write_shard(join_url(url, f"train-{s:05d}.tar"), samples)
        entries.append({"name": f"train-{s:05d}.tar", "split": "train", "num_samples": 5, "sha256": info["sha256"],
                        "num_bytes": info["num_bytes"], "offsets": info["offsets"], "keys": info["keys"]})
    with open_url(join_url(url, "manifest.json"), "wb") as f:
        f.write(json.dumps({"shards": entries}).encode())

    index = ShardIndex(url, retries=10, retry_wait_s=0.5)
    assert [s["__key__"] for s in index.read([0, 7])] == [keys[0], keys[7]]
    own_store.stop()
    restarted = threading.Event()

    def restart_later():
        time.sleep(30.0)
        own_store.start(timeout_s=60)
        restarted.set()

    thread = threading.Thread(target=restart_later, daemon=True)
    thread.start()
    ids = [19, 3, 11, 6, 14, 0]
    got = index.read(ids)  # blocks in retries until the store is back
    thread.join(timeout=120)
    assert restarted.is_set()
    assert [s["__key__"] for s in got] == [keys[i] for i in ids]
    assert index.retry_count >= 3 and index.ranged_reads == 2 + len(ids)
