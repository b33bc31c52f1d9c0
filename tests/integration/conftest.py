"""Fixtures shared by the integration tests: real corpus -> shards in the S3 store via `ray job submit`."""

from __future__ import annotations

import json
import os

import pytest

from musiclora.storage import get_fs, join_url, open_url

from .jobs import REPO, SHARDS, SHARDS_WITH_VAL, submit


@pytest.fixture(scope="session")
def corpus_metadata():
    """4 real tracks from the Debian music packages (cached under .musiclora/cache/corpus)."""
    from musiclora.data.corpus import build_corpus

    info = build_corpus("demo", cache_dir=REPO / ".musiclora" / "cache" / "corpus", max_tracks=4)
    assert info.num_tracks >= 2
    return str(info.metadata_path)


@pytest.fixture(scope="session")
def shards(ray_cluster, s3_store, corpus_metadata, tiny_musicgen_dir):
    """MusicGen-Melody shards of the real tracks, written by `ray job submit ray_jobs/prepare.py`."""
    os.environ.update(s3_store.env())
    rc, out, result = submit(
        ray_cluster, "ray_jobs/prepare.py", "--config", "ray_jobs/configs/prepare_musicgen_melody_tiny.yaml",
        f"metadata={corpus_metadata}", f"base={tiny_musicgen_dir}", f"output_url={SHARDS}",
        "segment_s=4.0", "max_segments_per_track=4", "samples_per_shard=4",
    )
    assert rc == 0, out[-4000:]
    assert result["num_samples"]["train"] >= 8
    return result


@pytest.fixture(scope="session")
def shards_with_val(shards):
    """The same shards with a quarter of them relabelled as the held-out `val` split."""
    with open_url(join_url(SHARDS, "manifest.json")) as f:
        manifest = json.load(f)
    fs, _ = get_fs(SHARDS)
    train = [s for s in manifest["shards"] if s["split"] == "train"]
    n_val = max(1, len(train) // 4)
    for i, s in enumerate(train):
        s = dict(s, split="val" if i < n_val else "train")
        fs.copy(get_fs(join_url(SHARDS, train[i]["name"]))[1], get_fs(join_url(SHARDS_WITH_VAL, s["name"]))[1])
        train[i] = s
    manifest["shards"] = train
    manifest["num_samples"] = {sp: sum(s["num_samples"] for s in train if s["split"] == sp) for sp in ("train", "val")}
    with open_url(join_url(SHARDS_WITH_VAL, "manifest.json"), "wb") as f:
        f.write(json.dumps(manifest).encode())
    return manifest
