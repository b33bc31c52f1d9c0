"""LoRA adapters: properties of apply/save/load on the tiny MusicGen-Melody."""

import pytest
import torch

from musiclora.adapters import apply_lora, check_targets, load_adapter, save_adapter, trainable_report
from musiclora.config import AdapterConfig
from musiclora.models.families import get_family

FAM = get_family("musicgen-melody")


def _logits(model, tok):
    text = tok(["orchestral battle"], return_tensors="pt")
    ids = torch.full((4, 6), 2048, dtype=torch.long)
    ids[:, 1:] = torch.arange(5)
    with torch.no_grad():
        return model(**text, decoder_input_ids=ids).logits


def test_fresh_adapter_leaves_outputs_unchanged_and_only_lora_trains():
    loaded = FAM.load("tiny")
    before = _logits(loaded.model, loaded.tokenizer)
    model = apply_lora(loaded.model, FAM, AdapterConfig()).eval()
    assert torch.allclose(before, _logits(model, loaded.tokenizer))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(".self_attn." in n for n in trainable)
    rep = trainable_report(model)
    assert 0 < rep["trainable"] < rep["total"] and rep["trainable_pct"] == pytest.approx(
        100 * rep["trainable"] / rep["total"], abs=1e-3)


@pytest.mark.parametrize("preset, extra", [("attn+ffn", "fc1"), ("attn+cond", "enc_to_dec_proj")])
def test_presets_add_their_modules(preset, extra):
    loaded = FAM.load("tiny")
    model = apply_lora(loaded.model, FAM, AdapterConfig(preset=preset))
    assert any(extra in n and "lora_" in n for n, _ in model.named_parameters())


def test_targets_that_match_nothing_are_refused():
    loaded = FAM.load("tiny")
    with pytest.raises(ValueError, match="matches no linear layer"):
        check_targets(loaded.model, FAM, AdapterConfig(target_modules=["self_attn.nonexistent"]))
    with pytest.raises(ValueError, match="unknown LoRA preset"):
        check_targets(loaded.model, FAM, AdapterConfig(preset="everything"))


def test_save_then_load_gives_identical_outputs(tmp_path):
    loaded = FAM.load("tiny")
    model = apply_lora(loaded.model, FAM, AdapterConfig())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.eval()
    trained = _logits(model, loaded.tokenizer)
    url = str(tmp_path / "adapter")
    save_adapter(model, url, card={"family": FAM.name})
    fresh = FAM.load("tiny")
    assert not torch.allclose(trained, _logits(fresh.model, fresh.tokenizer))
    reloaded = load_adapter(fresh.model, url, FAM)
    assert torch.allclose(trained, _logits(reloaded, fresh.tokenizer), atol=1e-6)


def test_empty_tensors_are_refused(tmp_path):
    loaded = FAM.load("tiny")
    model = apply_lora(loaded.model, FAM, AdapterConfig())
    from musiclora.adapters import lora_state_dict

    empty = {k: torch.empty(0) for k in lora_state_dict(model)}
    with pytest.raises(ValueError, match="empty"):
        save_adapter(model, str(tmp_path / "a"), state_dict=empty)
