"""GenerationRequest validation, and generation on the model's device: every module's inputs sit on
that module's parameters' device (CPU here; CUDA too where the machine has one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from musiclora.generate import parse_dtype, resolve_device
from musiclora.models.base import GenerationRequest
from musiclora.models.families import get_family

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("kwargs, match", [
    ({"duration_s": 0.0}, "duration_s"),
    ({"duration_s": float("nan")}, "duration_s"),
    ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"steps": 0}, "steps"),
    ({"melody": np.zeros((2, 100), np.float32), "melody_sample_rate": 16000}, "mono"),
    ({"melody": np.zeros(0, np.float32), "melody_sample_rate": 16000}, "mono"),
    ({"melody": np.full(100, np.nan, np.float32), "melody_sample_rate": 16000}, "NaN"),
    ({"melody": np.zeros(100, np.float32)}, "sample rate"),
])
def test_bad_requests_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationRequest("x", **kwargs)


def test_a_good_request_is_normalised():
    req = GenerationRequest("x", 1.0, seed=np.int64(4), steps=3.0, melody=[0.1, 0.2], melody_sample_rate=16000.0)
    assert req.seed == 4 and req.steps == 3 and req.melody.dtype == np.float32 and req.melody_sample_rate == 16000
    with pytest.raises(TypeError, match="prompt"):
        GenerationRequest(None)


def test_device_and_dtype_names_are_checked():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="expected cpu, cuda or cuda:N"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    assert parse_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="float32"):
        parse_dtype("double")


def _device_guard(model: torch.nn.Module) -> list:
    """Forward pre-hooks on every module with parameters: each tensor input must sit on its device."""
    seen: list[str] = []

    def check(module, args, kwargs):
        device = next(module.parameters(recurse=False)).device
        for x in [*args, *kwargs.values()]:
            if isinstance(x, torch.Tensor):
                assert x.device == device, f"{type(module).__name__} got an input on {x.device}, params on {device}"
        seen.append(type(module).__name__)

    for m in model.modules():
        if next(m.parameters(recurse=False), None) is not None:
            m.register_forward_pre_hook(check, with_kwargs=True)
    return seen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["musicgen-melody", "audioldm"])
def test_generation_keeps_every_input_on_the_model_device(family, device):
    fam = get_family(family)
    loaded = fam.load("tiny")
    model = loaded.model.to(device)
    seen = _device_guard(model)
    sr = fam.sample_rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(sr) / sr)).astype(np.float32)
    for req in (GenerationRequest("calm piano", 0.3, seed=1, steps=2),
                GenerationRequest("calm piano", 0.3, seed=1, steps=2, melody=tone, melody_sample_rate=sr)):
        audio, rate = fam.generate(model, loaded.tokenizer, req)
        again, _ = fam.generate(model, loaded.tokenizer, req)
        assert isinstance(audio, np.ndarray) and audio.dtype == np.float32 and rate == sr
        assert audio.shape == (round(0.3 * sr),) and np.array_equal(audio, again)  # a seed, a device: one clip
    assert len(seen) > 10  # the hooks ran
