"""One attach operation: per family, an adapter trained a few steps on the tiny model and published
the way training publishes it gives the training-time audio through every attach path (`generate`,
evaluate's loader, the serving host) and differs from the base; a folder that does not fit the
family's LoRA root is refused instead of loading as a silent no-op."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch

from musiclora.adapter_registry import Registry
from musiclora.adapters import apply_lora, lora_state_dict
from musiclora.config import AdapterConfig
from musiclora.models.audioldm import AudioLDMFamily
from musiclora.models.base import GenerationRequest, Segment
from musiclora.models.families import get_family

PROMPT = "calm piano"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(fam, loaded):
    sr = fam.sample_rate
    t = np.arange(int(2.56 * sr)) / sr
    segs = [Segment(f"s{i}", (0.3 * np.sin(2 * np.pi * 220 * (i + 1) * t)).astype(np.float32), t.size, PROMPT)
            for i in range(2)]
    raw = fam.encode_segments(loaded, segs)
    dec = [{k: (np.load(io.BytesIO(v), allow_pickle=False) if k.endswith(".npy") else v) for k, v in s.items()}
           for s in raw]
    return fam.collate(dec, loaded)


def _pcm16(audio: np.ndarray) -> np.ndarray:
    """What a WAV of `audio` reads back as (the generate command and the server write PCM 16)."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1, 1), 8000, subtype="PCM_16", format="WAV")
    return sf.read(io.BytesIO(buf.getvalue()), dtype="float32")[0]


@pytest.fixture(scope="module", params=["musicgen-melody", "audioldm"])
def published(request, tmp_path_factory):
    """(family, base folder, adapter URL, request, training-time audio, base audio)."""
    from musiclora.train.checkpoint import new_state, write_checkpoint
    from musiclora.train.trainer import publish_adapter

    torch.set_num_threads(1)
    fam = get_family(request.param)
    tmp = tmp_path_factory.mktemp(request.param)
    base = fam.save_tiny(str(tmp / "base"))
    loaded = fam.load(base)
    req = GenerationRequest(PROMPT, 0.5, guidance_scale=3.0, seed=3, steps=3)
    base_audio = fam.generate(loaded.model, loaded.tokenizer, req)[0]
    batch = _batch(fam, loaded)
    model = apply_lora(loaded.model, fam, AdapterConfig(lora_dropout=0.0)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    torch.manual_seed(0)
    for _ in range(3):
        loss = fam.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    trained_audio = fam.generate(model, loaded.tokenizer, req)[0]
    root = fam.lora_root(model)  # as train/loop.py checkpoints and train/trainer.py publishes
    write_checkpoint(str(tmp / "ckpt"), root, lora_state_dict(root), None, new_state())
    card = {"family": fam.name, "base_model": base, "training": {"best": None, "losses": [1.0, 0.9], "val": []}}
    url = str(tmp / "adapter")
    publish_adapter(str(tmp / "ckpt"), url, card)
    return fam, base, url, req, trained_audio, base_audio


def test_training_changed_the_output(published):
    _, _, _, _, trained, base = published
    assert trained.shape == base.shape and not np.allclose(trained, base, atol=1e-3)


def test_generate_command_attaches_it(published, tmp_path):
    from musiclora.generate import generate

    fam, _, url, req, trained, _ = published
    info = generate(req.prompt, str(tmp_path / "a.wav"), adapter=url, duration_s=req.duration_s,
                    guidance_scale=req.guidance_scale, seed=req.seed, steps=req.steps, device="cpu")
    audio = sf.read(info["wav"], dtype="float32")[0]
    assert info["family"] == fam.name
    np.testing.assert_allclose(audio, _pcm16(trained), atol=2 / 32768)


def test_evaluate_loader_attaches_it(published):
    from musiclora.eval.evaluate import EvalSettings, _load_with_adapter

    fam, _, url, req, trained, base = published
    got_fam, loaded, info = _load_with_adapter(url, EvalSettings())
    assert got_fam.name == fam.name and info["family"] == fam.name
    audio = fam.generate(loaded.model, loaded.tokenizer, req)[0]
    np.testing.assert_allclose(audio, trained, atol=1e-5)
    with fam.lora_root(loaded.model).disable_adapter():  # what evaluate's "base" side runs
        np.testing.assert_allclose(fam.generate(loaded.model, loaded.tokenizer, req)[0], base, atol=1e-5)


def test_serving_host_attaches_it(published, tmp_path):
    from serve.host import GenParams, ModelHost

    fam, base, url, req, trained, base_audio = published
    reg = Registry(str(tmp_path / "registry"))
    reg.publish(url, "tuned")
    host = ModelHost(fam.name, base, reg.url, torch_threads=1, device="cpu")
    host.load_blocking("tuned@1")
    host.hold("tuned@1")
    params = GenParams(req.prompt, req.duration_s, req.guidance_scale, req.seed, req.steps)
    tuned, plain = host.executor.submit(host.run, [("tuned@1", params), (None, params)]).result()
    np.testing.assert_allclose(sf.read(io.BytesIO(tuned.audio), dtype="float32")[0], _pcm16(trained),
                               atol=2 / 32768)
    np.testing.assert_allclose(sf.read(io.BytesIO(plain.audio), dtype="float32")[0], _pcm16(base_audio),
                               atol=2 / 32768)
    assert tuned.steps == (req.steps if fam.takes_steps else None)


def test_a_unet_adapter_on_the_whole_audioldm_model_is_refused(tmp_path):
    """What eval/evaluate.py did before: peft on the whole model found none of the UNet adapter's
    keys and left every LoRA B at zero (only a warning). attach_adapter refuses such a folder."""
    fam = get_family("audioldm")
    loaded = fam.load("tiny")
    model = apply_lora(loaded.model, fam, AdapterConfig())
    fam.lora_root(model).save_pretrained(str(tmp_path / "unet_adapter"), safe_serialization=True)

    class WholeModel(AudioLDMFamily):
        lora_root_attr = None

    with pytest.raises(ValueError, match="not in the folder"):
        WholeModel().attach_adapter(fam.load("tiny").model, str(tmp_path / "unet_adapter"))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        fam.attach_adapter(fam.load("tiny").model, str(tmp_path))


def test_a_refused_adapter_leaves_the_model_as_it_was(tmp_path):
    fam = get_family("audioldm")
    model = apply_lora(fam.load("tiny").model, fam, AdapterConfig())
    fam.lora_root(model).save_pretrained(str(tmp_path / "unet_adapter"), safe_serialization=True)

    class WholeModel(AudioLDMFamily):
        lora_root_attr = None

    plain = fam.load("tiny").model
    names = [n for n, _ in plain.named_modules()]
    with pytest.raises(ValueError):
        WholeModel().attach_adapter(plain, str(tmp_path / "unet_adapter"))
    assert [n for n, _ in plain.named_modules()] == names
    attached = fam.attach_adapter(plain, str(tmp_path / "unet_adapter"))  # the right root still takes it
    assert fam.lora_root(attached).peft_config


def test_a_second_adapter_whose_name_is_inside_module_paths_attaches(tmp_path):
    """peft filters missing keys by substring: an adapter named "y" must not count "layers..." keys."""
    from tests.serve_helpers import make_random_adapter

    fam = get_family("musicgen-melody")
    model = fam.load("tiny").model
    first = make_random_adapter("tiny", str(tmp_path / "a"), 1)
    second = make_random_adapter("tiny", str(tmp_path / "b"), 2)
    model = fam.attach_adapter(model, first, adapter_name="x")
    model = fam.attach_adapter(model, second, adapter_name="y")
    root = fam.lora_root(model)
    assert set(root.peft_config) == {"x", "y"} and root.active_adapter == "y"
    lora_b = [p for n, p in root.named_parameters() if ".lora_B.y." in n]
    assert lora_b and any(float(p.abs().sum()) > 0 for p in lora_b)  # loaded, not left at zero


@pytest.mark.parametrize("family", ["musicgen-melody", "audioldm"])
def test_merged_adapter_generates_what_the_unmerged_one_does(family, tmp_path):
    """`load_for_inference(merge=True)` folds the adapter into the weights: same audio, no LoRA branch."""
    from musiclora.adapters import load_for_inference
    from tests.serve_helpers import make_random_adapter

    adapter = make_random_adapter("tiny", str(tmp_path / "a"), 3, family=family)
    request = GenerationRequest(prompt="calm piano", duration_s=0.5, seed=4, steps=3)
    fam, plain = load_for_inference(adapter, "tiny", family)
    _, merged = load_for_inference(adapter, "tiny", family, merge=True)
    _, base = load_for_inference(None, "tiny", family)
    a = fam.generate(plain.model, plain.tokenizer, request)[0]
    b = fam.generate(merged.model, merged.tokenizer, request)[0]
    assert np.abs(a - b).max() < 1e-3
    assert not np.allclose(b, fam.generate(base.model, base.tokenizer, request)[0], atol=1e-3)
    assert all(layer.merged for layer in fam.lora_root(merged.model).modules() if hasattr(layer, "merged"))
