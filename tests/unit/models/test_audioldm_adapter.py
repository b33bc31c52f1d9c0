"""AudioLDM LoRA and generation: presets, training lowers the loss, adapters load in plain
diffusers / peft onto a bare UNet, generation from text or a reference clip, with or without one."""

import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from musiclora.adapters import apply_lora, trainable_report
from musiclora.audio import AudioDecodeError
from musiclora.config import AdapterConfig
from musiclora.models.base import GenerationRequest, Segment
from musiclora.models.families import get_family

SR = 16000
FAM = get_family("audioldm")



@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return FAM.save_tiny(str(tmp_path_factory.mktemp("tiny_audioldm")))


@pytest.fixture(scope="module")
def batch():
    loaded = FAM.load("tiny")
    t = np.arange(int(2.56 * SR)) / SR
    segs = [Segment(f"s{i}", (0.3 * np.sin(2 * np.pi * 220 * (i + 1) * t) * (1 + np.sin(2 * np.pi * 2 * t)))
                    .astype(np.float32), t.size, "calm piano") for i in range(4)]
    raw = FAM.encode_segments(loaded, segs)
    dec = [{k: (np.load(io.BytesIO(v)) if k.endswith(".npy") else v) for k, v in s.items()} for s in raw]
    return FAM.collate(dec, loaded)


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 8, 32, 16, generator=g)
    label = torch.nn.functional.normalize(torch.randn(1, 16, generator=g), dim=-1)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), encoder_hidden_states=None, class_labels=label).sample


def _perturbed_adapter(preset="attn", std=0.05):
    loaded = FAM.load("tiny")
    model = apply_lora(loaded.model, FAM, AdapterConfig(preset=preset))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, std, generator=torch.Generator().manual_seed(1))
    return loaded, model.eval()


@pytest.mark.parametrize("preset, extra", [("attn", None), ("attn+time", "time_embedding.linear_2"),
                                           ("attn+out", "ff.net.2")])
def test_presets_put_lora_in_the_unet_only_and_start_as_a_no_op(preset, extra):
    loaded = FAM.load("tiny")
    before = _unet_out(loaded.model.unet.eval())
    model = apply_lora(loaded.model, FAM, AdapterConfig(preset=preset))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("unet.") and "lora_" in n for n in trainable)
    assert any(".to_out.0.lora_A" in n for n in trainable)
    if extra:
        assert any(f"{extra}.lora_A" in n for n in trainable)
    assert not any("vae." in n or "text_encoder." in n for n, p in model.named_parameters() if "lora_" in n)
    assert torch.allclose(before, _unet_out(model.unet.eval()))
    assert 0 < trainable_report(model)["trainable_pct"] < 100


def test_lora_training_lowers_the_loss(batch):
    """LoRA alone (base frozen) moves the tiny UNet's denoising loss down on a fixed batch."""
    loaded = FAM.load("tiny")
    model = apply_lora(loaded.model, FAM, AdapterConfig(preset="attn+time", lora_dropout=0.0))
    frozen = {n: p.clone() for n, p in model.unet.named_parameters() if "lora_" not in n}

    def held_out_loss():
        model.eval()
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(123)
            value = float(np.mean([FAM.loss(model, batch).item() for _ in range(8)]))
        model.train()
        return value

    start = held_out_loss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    for _ in range(40):
        loss = FAM.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = held_out_loss()
    assert end < start - 0.015, (start, end)
    assert all(torch.equal(p, frozen[n]) for n, p in model.unet.named_parameters() if "lora_" not in n)


def test_saved_adapter_loads_in_plain_peft_and_diffusers_onto_a_bare_unet(tiny_dir, tmp_path):
    from diffusers import UNet2DConditionModel
    from peft import PeftModel
    from safetensors.torch import load_file

    _, model = _perturbed_adapter("attn+time")
    ours = _unet_out(model.unet)
    folder = tmp_path / "adapter"
    FAM.lora_root(model).save_pretrained(str(folder), safe_serialization=True)  # as the training loop saves it
    keys = load_file(str(folder / "adapter_model.safetensors"))
    assert keys and all(k.startswith("base_model.model.") and "lora_" in k for k in keys)

    base = _unet_out(UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet").eval())
    assert (ours - base).abs().max() > 1e-4  # the adapter changes the output
    via_peft = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet"), str(folder))
    assert torch.allclose(_unet_out(via_peft.eval()), ours, atol=1e-6)

    config = json.loads((folder / "adapter_config.json").read_text())
    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet").eval()
    state = {k.removeprefix("base_model.model."): v for k, v in keys.items()}
    unet.load_lora_adapter(state, prefix=None, metadata={k: config[k] for k in ("r", "lora_alpha", "target_modules")})
    assert torch.allclose(_unet_out(unet), ours, atol=1e-6)


# --------------------------------------------------------------------------- generation


def test_generate_is_seeded_and_conditioned(tiny_dir):
    loaded = FAM.load(tiny_dir)

    def gen(**kw):
        return FAM.generate(loaded.model, loaded.tokenizer,
                            GenerationRequest(kw.pop("prompt", "calm piano"), 1.0, steps=3, **kw))[0]

    a, b = gen(seed=1), gen(seed=1)
    assert a.shape == (SR,) and a.dtype == np.float32 and np.array_equal(a, b) and np.sqrt((a**2).mean()) > 1e-4
    assert not np.allclose(a, gen(seed=2))
    assert not np.allclose(a, gen(seed=1, prompt="epic battle drums"))
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(SR) / SR)).astype(np.float32)
    ref = gen(seed=1, melody=tone, melody_sample_rate=SR)
    assert ref.shape == a.shape and not np.allclose(ref, a)
    assert not np.allclose(a, gen(seed=1, guidance_scale=1.0))
    assert FAM.generate(loaded.model, loaded.tokenizer, GenerationRequest("x", 0.3, steps=2))[0].shape == (int(0.3 * SR),)


@pytest.mark.parametrize("kwargs, match", [
    ({"melody": np.zeros(SR, np.float32), "melody_sample_rate": SR}, "silent"),
    ({"melody": np.ones(100, np.float32) * 0.5, "melody_sample_rate": SR}, "at least 0.1 s"),
    ({"melody": np.ones(SR, np.float32) * 0.5}, "sample rate"),
    ({"steps": 0}, "steps"),
    ({"duration_s": 0.0}, "duration_s"),
])
def test_generate_rejects_bad_input(tiny_dir, kwargs, match):
    loaded = FAM.load("tiny")
    args = {"duration_s": 0.5, "steps": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        FAM.generate(loaded.model, loaded.tokenizer, GenerationRequest("x", **args))


def test_generate_command_with_adapter_and_reference(tiny_dir, tmp_path):
    """musiclora.generate: adapter folder attached to the UNet; a reference WAV; bad reference files."""
    from musiclora.generate import generate

    _, model = _perturbed_adapter("attn", std=0.3)
    adapter = tmp_path / "adapter"
    FAM.lora_root(model).save_pretrained(str(adapter), safe_serialization=True)
    (adapter / "card.json").write_text(json.dumps({"family": "audioldm", "base_model": tiny_dir}))
    base = generate("calm piano", str(tmp_path / "base.wav"), family="audioldm", base=tiny_dir, duration_s=1.0, steps=3)
    tuned = generate("calm piano", str(tmp_path / "tuned.wav"), adapter=str(adapter), duration_s=1.0, steps=3)
    a, sr = sf.read(base["wav"], dtype="float32")
    b, _ = sf.read(tuned["wav"], dtype="float32")
    assert sr == SR and tuned["family"] == "audioldm" and a.shape == b.shape == (SR,)  # a mono family: one channel
    assert base["channels"] == tuned["channels"] == 1 and base["duration_s"] == 1.0
    assert not np.allclose(a, b) and (tmp_path / "tuned.png").stat().st_size > 0

    clip = tmp_path / "voice.wav"
    sf.write(clip, (0.3 * np.sin(2 * np.pi * 330 * np.arange(2 * 44100) / 44100)).astype(np.float32), 44100)
    ref = generate("", str(tmp_path / "ref.wav"), adapter=str(adapter), duration_s=1.0, steps=3, reference=str(clip))
    assert ref["reference"] == str(clip) and ref["rms"] > 0
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(SR, np.float32), SR)
    with pytest.raises(ValueError, match="silent"):
        generate("", str(tmp_path / "x.wav"), adapter=str(adapter), duration_s=0.5, steps=2, reference=str(silent))
    junk = tmp_path / "notes.wav"
    junk.write_text("not audio at all")
    with pytest.raises(AudioDecodeError):
        generate("", str(tmp_path / "x.wav"), adapter=str(adapter), duration_s=0.5, steps=2, reference=str(junk))
    with pytest.raises(ValueError, match="not both"):
        generate("", str(tmp_path / "x.wav"), adapter=str(adapter), melody=str(clip), reference=str(clip))
