"""The one device rule (issue 13): every batch tensor and every reduced tensor lives on the
engine's device. The model sits on the `meta` device, so any tensor left on the CPU fails."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from musiclora.adapters import apply_lora
from musiclora.config import AdapterConfig
from musiclora.models.families import get_family
from musiclora.train import validate
from musiclora.train.device import (
    batch_to_device,
    deepspeed_args,
    ds_accelerator,
    local_device,
    set_ds_accelerator,
)
from musiclora.train.loop import train_step
from tests.unit.train.helpers import FakeEngine, synthetic_batch


@pytest.fixture
def meta_friendly_masks(monkeypatch):
    """transformers skips building an SDPA mask when no token is padded, which reads the mask's
    values (`.all()`): impossible on meta tensors. Always build the mask instead (same outputs)."""
    import transformers.masking_utils as masking

    monkeypatch.setattr(masking, "_ignore_bidirectional_mask_sdpa", lambda *a, **k: False)
    monkeypatch.setattr(masking, "_ignore_causal_mask_sdpa", lambda *a, **k: False)


def _meta_engine(name: str):
    family = get_family(name)
    loaded = family.load("tiny")
    batch = synthetic_batch(family, loaded)
    model = apply_lora(loaded.model, family, AdapterConfig()).train().to("meta")
    return family, FakeEngine(model, "meta"), batch


def test_batch_to_device_moves_every_tensor_and_keeps_dtypes():
    batch = {"codes": torch.zeros(2, 4, 3, dtype=torch.long), "valid": torch.ones(2, 3, dtype=torch.bool), "n": 3}
    moved = batch_to_device(batch, "meta")
    assert {k: v.device.type for k, v in moved.items() if torch.is_tensor(v)} == {"codes": "meta", "valid": "meta"}
    assert moved["codes"].dtype == torch.long and moved["valid"].dtype == torch.bool and moved["n"] == 3
    assert batch["codes"].device.type == "cpu"  # the input is not modified


@pytest.mark.parametrize("name", ["musicgen-melody", "audioldm"])
def test_train_step_runs_with_the_model_on_another_device(name, meta_friendly_masks):
    family, engine, batch = _meta_engine(name)
    assert all(v.device.type == "cpu" for v in batch.values() if torch.is_tensor(v))  # as the loader yields it
    loss = train_step(engine, family, batch)
    assert loss.device.type == "meta" and loss.dim() == 0
    lora = [p for n, p in engine.module.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and p.grad.device.type == "meta" for p in lora)


def test_musicgen_loss_without_the_move_fails_on_another_device(meta_friendly_masks):
    """The defect train_step fixes: MusicGen's loss does not move the batch itself."""
    family, engine, batch = _meta_engine("musicgen-melody")
    with pytest.raises(RuntimeError, match="device"):
        family.loss(engine, batch)


class _Reduced(Exception):
    pass


@pytest.fixture
def reduce_spy(monkeypatch):
    """Pretend a process group is up; record the device of each all-reduced tensor, then stop."""
    devices: list[str] = []

    def all_reduce(tensor, op=None):
        devices.append(tensor.device.type)
        raise _Reduced

    fake = SimpleNamespace(is_initialized=lambda: True, all_reduce=all_reduce, ReduceOp=dist.ReduceOp)
    monkeypatch.setattr(validate, "dist", fake)  # validate.py's collectives only
    return devices


@pytest.mark.parametrize("name", ["musicgen-melody", "audioldm"])
def test_validation_runs_and_reduces_on_the_engine_device(name, meta_friendly_masks, reduce_spy):
    """NCCL reduces CUDA tensors only: the sums must live where the model runs."""
    family, engine, batch = _meta_engine(name)
    with pytest.raises(_Reduced):
        validate.validation_loss(engine, family, [{"batch": batch, "weight": 2}, {"batch": batch, "weight": 0}])
    assert reduce_spy == ["meta"]
    assert engine.training  # back in training mode before the collective


def test_ds_accelerator_follows_use_gpu():
    assert ds_accelerator(True) == "cuda" and ds_accelerator(False) == "cpu"


def test_set_ds_accelerator_refuses_a_late_switch(monkeypatch):
    """DeepSpeed picks its accelerator once per process: a GPU run in a process where it already
    chose the CPU must fail loudly instead of training on the CPU."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert get_accelerator()._name == "cpu"
    set_ds_accelerator(False)
    with pytest.raises(RuntimeError, match="DS_ACCELERATOR=cuda"):
        set_ds_accelerator(True)


def test_local_device_outside_ray_train_is_cuda_or_cpu():
    assert local_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_deepspeed_args_pin_the_engine_to_the_assigned_gpu():
    """DeepSpeed would take cuda:<LOCAL_RANK>; Ray Train's assigned GPU can differ on shared nodes."""
    assert deepspeed_args(torch.device("cpu")) is None
    assert deepspeed_args(torch.device("cuda", 3)).device_rank == 3
