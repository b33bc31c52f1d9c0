"""LoRA slots: an adapter copied into a slot runs exactly as peft's own attach does (same rank),
a lower rank zero-pads, a freed slot is a no-op, adapters that do not fit are refused with
SlotMismatch, and loading never adds modules (why the load time stays flat)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from musiclora.adapters import apply_lora, save_adapter
from musiclora.config import AdapterConfig
from musiclora.models.base import GenerationRequest
from musiclora.models.batching import BASE_ROW
from musiclora.models.families import get_family
from musiclora.models.lora_slots import LoraSlots, SlotMismatch
from tests.serve_helpers import make_random_adapter

REQ = GenerationRequest("calm piano", 0.3, seed=4)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _adapter(tmp: Path, seed: int, **cfg) -> str:
    fam = get_family("musicgen-melody")
    if not cfg:
        return make_random_adapter("tiny", str(tmp / f"a{seed}"), seed)
    root = apply_lora(fam.load("tiny").model, fam, AdapterConfig(**cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in root.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return save_adapter(root, str(tmp / f"a{seed}"))


def test_slots_run_adapters_as_peft_does_and_loads_add_no_modules(tmp_path):
    fam = get_family("musicgen-melody")
    a8, a4 = _adapter(tmp_path, 1), _adapter(tmp_path, 2, r=4, lora_alpha=8)
    want = {n: fam.generate(fam.attach_adapter(fam.load("tiny").model, d, n), _tok(), REQ)[0]
            for n, d in (("x", a8), ("y", a4))}
    want[BASE_ROW] = fam.generate(fam.load("tiny").model, _tok(), REQ)[0]

    slots = LoraSlots(fam.load("tiny").model, capacity=3, r=8, target_modules=fam.target_modules("attn"))
    model = slots.root
    modules = sum(1 for _ in model.named_modules())
    s8, s4 = slots.load(a8), slots.load(a4)
    assert slots.free_count() == 1 and sum(1 for _ in model.named_modules()) == modules
    got = fam.generate_batch(model, _tok(), [REQ, REQ, REQ], [s8, s4, BASE_ROW])
    np.testing.assert_array_equal(got[0][0], want["x"])  # same rank: the same arithmetic
    np.testing.assert_allclose(got[1][0], want["y"], atol=1e-4)  # rank 4 zero-padded to 8
    np.testing.assert_array_equal(got[2][0], want[BASE_ROW])
    slots.release(s8)
    np.testing.assert_array_equal(fam.generate_batch(model, _tok(), [REQ], [s8])[0][0], want[BASE_ROW])
    for _ in range(20):  # come and go: still the same modules
        slots.release(slots.load(a8))
    assert sum(1 for _ in model.named_modules()) == modules and slots.free_count() == 2


def test_adapters_that_do_not_fit_are_refused(tmp_path):
    fam = get_family("musicgen-melody")
    slots = LoraSlots(fam.load("tiny").model, capacity=1, r=4, target_modules=fam.target_modules("attn"))
    with pytest.raises(SlotMismatch, match="rank 8 is above"):
        slots.load(_adapter(tmp_path, 1))
    with pytest.raises(SlotMismatch, match="not a LoRA weight of a slot-targeted module"):
        slots.load(_adapter(tmp_path, 2, r=4, preset="attn+ffn"))
    dora = Path(shutil.copytree(_adapter(tmp_path, 3, r=4), tmp_path / "dora"))
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(SlotMismatch, match="use_dora"):
        slots.load(str(dora))
    slots.load(_adapter(tmp_path, 4, r=4))
    with pytest.raises(SlotMismatch, match="all 1 LoRA slots"):
        slots.load(_adapter(tmp_path, 5, r=4))


def _tok():
    from musiclora.models.musicgen import build_t5_tokenizer

    return build_t5_tokenizer()


def test_audioldm_unet_slots_run_the_adapter_as_peft_does(tmp_path):
    fam = get_family("audioldm")
    req = GenerationRequest("calm piano", 0.3, seed=4, steps=3)
    folder = make_random_adapter("tiny", str(tmp_path / "u"), 1, family="audioldm")
    loaded = fam.load("tiny")
    want = fam.generate(fam.attach_adapter(fam.load("tiny").model, folder, "x"), loaded.tokenizer, req)[0]
    model = loaded.model
    slots = LoraSlots(fam.lora_root(model), capacity=2, r=8, target_modules=fam.target_modules("attn"))
    model = fam.with_lora_root(model, slots.root)
    slot = slots.load(folder)
    np.testing.assert_array_equal(fam.generate_batch(model, loaded.tokenizer, [req], [slot])[0][0], want)
