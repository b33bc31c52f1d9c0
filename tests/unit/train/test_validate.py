"""Validation is a fixed function of the adapter: seeded diffusion noise per sample, pads weigh nothing."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from musiclora.data.indexed import ShardIndex
from musiclora.data.shards import MANIFEST, write_shard
from musiclora.models.base import Segment
from musiclora.models.families import get_family
from musiclora.train.validate import key_seed, load_val_batches, val_plan, validation_loss

SR = 16000


@pytest.fixture(scope="module")
def audioldm():
    fam = get_family("audioldm")
    return fam, fam.load("tiny")


def _val_shards(root, fam, loaded, n: int = 3) -> str:
    t = np.arange(int(2.56 * SR)) / SR
    segs = [Segment(key=f"v{i}", audio=(0.3 * np.sin(2 * np.pi * 220 * (i + 1) * t)).astype(np.float32),
                    num_valid=len(t), caption=f"tone {i}") for i in range(n)]
    info = write_shard(str(root / "val-00000.tar"), fam.encode_segments(loaded, segs))
    entry = {"name": "val-00000.tar", "split": "val", "num_samples": n, "num_bytes": info["num_bytes"],
             "sha256": info["sha256"], "offsets": info["offsets"], "keys": info["keys"]}
    (root / MANIFEST).write_text(json.dumps({"shards": [entry]}))
    return str(root)


def test_the_same_adapter_gives_the_same_validation_loss(tmp_path, audioldm):
    fam, loaded = audioldm
    torch.set_num_threads(1)
    index = ShardIndex(_val_shards(tmp_path, fam, loaded), "val")
    batches = load_val_batches(index, 0, 1, 2, lambda s: fam.collate(s, loaded), max_batches=8)
    assert [b["weight"] for b in batches] == [2, 1]
    losses = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)  # the global generator must not matter
        losses.append(validation_loss(loaded.model, fam, batches))
    assert losses[0] == losses[1] == losses[2] and np.isfinite(losses[0])
    unseeded = {k: v for k, v in batches[0]["batch"].items() if k != "noise_seeds"}
    loaded.model.eval()
    assert float(fam.loss(loaded.model, unseeded)) != float(fam.loss(loaded.model, unseeded))  # what seeding fixes


def test_pads_even_out_ranks_and_weigh_nothing():
    plans = [val_plan(3, rank, 2, 2, max_batches=8) for rank in range(2)]
    assert plans == [[[(0, False), (1, False)]], [[(2, False), (0, True)]]]
    real = sorted(i for plan in plans for batch in plan for i, pad in batch if not pad)
    assert real == [0, 1, 2]
    assert val_plan(100, 0, 2, 4, max_batches=3) == val_plan(100, 0, 2, 4, max_batches=3)
    assert sum(len(b) for b in val_plan(100, 1, 2, 4, max_batches=3)) == 12


def test_key_seed_is_stable():
    assert key_seed("t000001_0_000000000") == int(hashlib.sha256(b"t000001_0_000000000").hexdigest()[:15], 16)
    assert key_seed("a") != key_seed("b")
