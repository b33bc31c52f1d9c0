"""Checkpoint state: AdamW moments and fp32 masters survive save -> load under ZeRO-2 and ZeRO-3
(the resumed engine steps exactly like the uninterrupted one), old formats, changed shards."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
from torch import nn

from musiclora.train import checkpoint as ckpt


@pytest.fixture(scope="module")
def dist_group():
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        deepspeed.init_distributed(dist_backend="gloo")
    yield


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(6, 3) * 0.1)
        self.lora_b = nn.Parameter(torch.randn(3, 6) * 0.1)

    def forward(self, x):
        return ((self.frozen(x) @ self.lora_a @ self.lora_b) ** 2).mean()


def _engine(stage: int):
    import deepspeed

    model = Tiny()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def _steps(engine, first: int, count: int):
    for step in range(first, first + count):
        torch.manual_seed(step)
        loss = engine(torch.randn(2, 6))
        engine.backward(loss)
        engine.step()


@pytest.mark.parametrize("stage", [2, 3])
def test_optimizer_state_round_trip_continues_identically(dist_group, tmp_path, stage):
    from safetensors.torch import load_file, save_file

    a = _engine(stage)
    _steps(a, 0, 3)
    tensors, step = ckpt.gather_optimizer(a)
    assert step == 3.0 and tensors["lora_a::exp_avg"].abs().sum() > 0
    save_file(tensors, str(tmp_path / ckpt.OPTIMIZER))

    b = _engine(stage)  # fresh weights and zero moments: everything must come from the file
    ckpt.restore_optimizer(b, load_file(str(tmp_path / ckpt.OPTIMIZER)), step)
    _steps(a, 3, 3)
    _steps(b, 3, 3)
    ta, sa = ckpt.gather_optimizer(a)
    tb, sb = ckpt.gather_optimizer(b)
    assert sa == sb == 6.0
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name


def test_restore_without_a_parameter_is_refused(dist_group):
    engine = _engine(2)
    with pytest.raises(ckpt.CheckpointError, match="another adapter configuration"):
        ckpt.restore_optimizer(engine, {}, 1.0)


def _folder(tmp_path, state: dict):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / ckpt.STATE).write_text(json.dumps(state))
    return str(tmp_path)


def test_an_old_checkpoint_is_migrated_not_a_key_error(tmp_path):
    folder = _folder(tmp_path, {"step": 5, "samples": 20, "losses": [1.0] * 5})  # format 1: no format key
    _, best, state, optimizer = ckpt.read_checkpoint(folder)
    assert state["step"] == 5 and state["samples"] == 20 and state["format"] == ckpt.FORMAT
    assert state["stopped_early"] is False and state["consumed"] == [] and optimizer is None and best is None


def test_a_newer_or_broken_checkpoint_is_refused(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="format 99"):
        ckpt.read_checkpoint(_folder(tmp_path, {"format": 99, "step": 1}))
    (tmp_path / ckpt.STATE).write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="not JSON"):
        ckpt.read_checkpoint(str(tmp_path))
    with pytest.raises(ckpt.CheckpointError, match="no state.json"):
        ckpt.read_checkpoint(str(tmp_path / "missing"))


def test_a_data_position_on_other_shards_is_refused_naming_both_digests():
    state = {"data": {"epoch": 1, "consumed": 3, "shards_digest": "a" * 64}}
    ckpt.check_data_position(state, "a" * 64, "s3://b/shards")
    ckpt.check_data_position({"data": None}, "b" * 64, "s3://b/shards")  # a fresh run has no position
    with pytest.raises(ckpt.CheckpointError, match=f"{'a' * 64}.*{'b' * 64}"):
        ckpt.check_data_position(state, "b" * 64, "s3://b/shards")


def test_step_seed_is_a_function_of_seed_step_and_rank():
    seeds = {ckpt.step_seed(s, t, r) for s in range(3) for t in range(50) for r in range(4)}
    assert len(seeds) == 3 * 50 * 4
