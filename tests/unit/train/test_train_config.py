"""DeepSpeed config and LR schedule built from TrainConfig."""

import math

import pytest

from musiclora.config import TrainConfig
from musiclora.train.deepspeed import build_ds_config
from musiclora.train.schedule import lr_at


def _cfg(**over):
    base = {"data": {"shards_url": "s3://b/s", "batch_size": 3},
            "run": {"storage_path": "s3://b/r", "adapters_url": "s3://b/a"}}
    for k, v in over.items():
        base.setdefault(k, {}).update(v)
    return TrainConfig.model_validate(base)


def test_zero2_fp32_default():
    ds = build_ds_config(_cfg())
    assert ds["zero_optimization"]["stage"] == 2 and not ds["bf16"]["enabled"]
    assert ds["train_micro_batch_size_per_gpu"] == 3


def test_zero3_bf16_offload_accumulation():
    ds = build_ds_config(_cfg(deepspeed={"zero_stage": 3, "precision": "bf16", "offload_optimizer": True},
                              optim={"grad_accum": 4}))
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and ds["bf16"]["enabled"]
    assert ds["gradient_accumulation_steps"] == 4


def test_warmup_then_cosine_to_zero():
    lrs = [lr_at(s, 1.0, 10, 110) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[60] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(0.0, abs=1e-12)
