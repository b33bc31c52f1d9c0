"""AudioLDM2 family: tiny preset and folder layout (checked against diffusers' AudioLDM2Pipeline),
shards, loss, LoRA (presets, trainable share, training, plain peft load), generation."""

import io
import json
import math

import numpy as np
import pytest
import torch

from musiclora.adapters import apply_lora, trainable_report
from musiclora.config import AdapterConfig
from musiclora.models.audioldm2 import AudioLDM2Family, _container
from musiclora.models.audioldm2_components import AudioLDM2, encode_prompts
from musiclora.models.base import Loaded, Segment
from musiclora.models.base import GenerationRequest
from musiclora.models.families import get_family

SR = 16000
FAM = get_family("audioldm2")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loaded():
    return FAM.load("tiny")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return FAM.save_tiny(str(tmp_path_factory.mktemp("tiny_audioldm2")))


def _tone(freq: float, seconds: float, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def _segments(n=2, seconds=2.56, valid_s=(2.56, 1.2), captions=("calm piano", "epic battle drums with strings")):
    segs = []
    for i in range(n):
        audio = np.zeros(int(seconds * SR), np.float32)
        valid = int(valid_s[i % len(valid_s)] * SR)
        audio[:valid] = _tone(220.0 * (i + 1), valid / SR)
        segs.append(Segment(key=f"s{i}", audio=audio, num_valid=valid, caption=captions[i % len(captions)]))
    return segs


def _decode(raw):
    return [{k: (np.load(io.BytesIO(v), allow_pickle=False) if k.endswith(".npy") else v) for k, v in s.items()}
            for s in raw]


@pytest.fixture(scope="module")
def batch(loaded):
    return FAM.collate(_decode(FAM.encode_segments(loaded, _segments())), loaded)


# --------------------------------------------------------------------------- tiny preset and folder layout


def test_tiny_keeps_audioldm2_shapes(loaded):
    m = loaded.model
    assert m.vae_scale_factor == 4 and m.vae.config.latent_channels == m.unet.config.in_channels == 8
    assert int(np.prod(m.vocoder.config.upsample_rates)) == 160 and m.vocoder.config.model_in_dim == 64
    gpt, t5 = m.language_model.config.n_embd, m.text_encoder_2.config.d_model
    # audioldm2-music: an extra self-attention, then cross-attention to GPT-2 and to T5 per block
    assert [list(d) for d in m.unet.config.cross_attention_dim] == [[None, gpt, t5]] * 3
    assert m.extras["uncond"].generated.shape == (1, 8, gpt)
    assert m.scheduler.config.prediction_type == "epsilon"


def test_prompt_states_match_diffusers_audioldm2_pipeline(loaded, tiny_dir):
    """Our CLAP + T5 -> projection -> GPT-2 path gives what AudioLDM2Pipeline.encode_prompt gives."""
    from diffusers import AudioLDM2Pipeline
    from transformers import GPT2LMHeadModel

    pipe = AudioLDM2Pipeline.from_pretrained(
        tiny_dir, language_model=GPT2LMHeadModel.from_pretrained(tiny_dir, subfolder="language_model"))
    prompts = ["calm piano", "epic battle drums with a fast rhythm"]
    with torch.no_grad():
        t5, mask, generated = pipe.encode_prompt(prompts, "cpu", 1, False)
    ours = encode_prompts(FAM.load(tiny_dir).model, loaded.tokenizer, prompts)
    assert torch.equal(mask, ours.t5_mask) and generated.shape == ours.generated.shape == (2, 8, 16)
    assert torch.allclose(t5 * mask[..., None], ours.t5, atol=1e-5)
    assert torch.allclose(generated, ours.generated, atol=1e-5)


def test_skeleton_is_meta_and_gives_the_loaded_feature_spec(loaded, tiny_dir):
    skel = FAM.skeleton(tiny_dir)
    assert next(skel.unet.parameters()).device.type == "meta"
    spec = FAM.feature_spec(Loaded(skel, None, tiny_dir, FAM.name))
    assert spec == FAM.feature_spec(loaded) and spec["frame_rate"] == 25.0 and spec["latent_channels"] == 8


def test_every_parameter_has_a_dimension_so_deepspeed_can_broadcast_it(loaded, tiny_dir):
    """DeepSpeed's engine broadcasts each parameter as bytes (`p.data.view(torch.uint8)`), which fails on a
    0-dim tensor (e.g. ClapModel's logit scales): the training container must hold none."""
    for model in (loaded.model, FAM.load(tiny_dir).model):
        assert not [n for n, p in model.named_parameters() if p.dim() == 0]


def test_unreadable_base_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot load AudioLDM2 component 'unet'"):
        FAM.load(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unet config"):
        FAM.skeleton(str(tmp_path / "nowhere"))


# --------------------------------------------------------------------------- shards and loss


def test_encode_segments_and_collate(loaded):
    dec = _decode(FAM.encode_segments(loaded, _segments()))
    assert dec[0]["latents.npy"].shape == (8, 64, 16) and dec[0]["latents.npy"].dtype == np.float16
    assert [d["json"]["num_frames"] for d in dec] == [64, math.ceil(1.2 * SR / 160 / 4)]
    assert dec[0]["generated.npy"].shape == (8, 16) and dec[0]["t5.npy"].shape[1] == 32
    assert dec[0]["t5.npy"].shape[0] < dec[1]["t5.npy"].shape[0]  # each caption keeps its own tokens
    # stored states are the ones generation computes for the caption alone
    alone = encode_prompts(loaded.model, loaded.tokenizer, ["epic battle drums with strings"])
    assert np.allclose(dec[1]["generated.npy"], alone.generated[0].numpy(), atol=1e-6)
    b = FAM.collate(dec, loaded)
    s = b["t5"].shape[1]
    assert b["latents"].shape == (2, 8, 64, 16) and b["valid"].sum(1).tolist() == [64, 30]
    assert b["t5_mask"].sum(1).tolist() == [dec[0]["t5.npy"].shape[0], dec[1]["t5.npy"].shape[0]]
    assert b["uncond_t5"].shape == (2, s, 32) and b["uncond_generated"].shape == (2, 8, 16)
    assert not b["t5"][0, dec[0]["t5.npy"].shape[0]:].any()  # zero padding


def test_loss_is_finite_masks_padding_and_dropout_uses_the_empty_prompt(loaded, batch):
    torch.manual_seed(0)
    loss = FAM.loss(loaded.model.eval(), batch)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and torch.isfinite(loss)
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

        def forward(self, x, t, gen, t5, mask):
            seen.append(gen)
            return x  # depends on the latents, so an error in padded frames would show

    spy = Spy(loaded.model)
    AudioLDM2Family({"caption_dropout": 0.999}).loss(spy.train(), batch)
    assert torch.allclose(seen[-1], batch["uncond_generated"])
    AudioLDM2Family({"caption_dropout": 0.999}).loss(spy.eval(), batch)
    assert torch.allclose(seen[-1], batch["generated"])
    padded = dict(batch, latents=batch["latents"].clone())
    padded["latents"][1, :, 30:] += 100.0  # beyond sample 1's 30 valid latent frames
    changed = dict(batch, latents=batch["latents"].clone())
    changed["latents"][1, :, :30] += 100.0
    losses = []
    for b in (batch, padded, changed):
        torch.manual_seed(1)
        losses.append(FAM.loss(spy.eval(), b))
    assert torch.allclose(losses[0], losses[1]) and losses[2] > losses[0] + 1.0


def test_options_are_validated():
    with pytest.raises(ValueError, match="model.options.caption_dropout"):
        AudioLDM2Family({"caption_dropout": 1.5})
    with pytest.raises(ValueError, match="model.options.condition"):
        AudioLDM2Family({"condition": "audio"})


def test_container_is_found_under_wrappers(loaded):
    class Engine(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert _container(Engine(loaded.model)) is loaded.model
    with pytest.raises(TypeError, match="AudioLDM2"):
        _container(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------- LoRA


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 8, 16, 16, generator=g)
    gen, t5 = torch.randn(1, 8, 16, generator=g), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), encoder_hidden_states=gen, encoder_hidden_states_1=t5,
                    encoder_attention_mask_1=torch.ones(1, 5, dtype=torch.long)).sample


@pytest.mark.parametrize("preset", ["study004", "attn"])
def test_presets_put_lora_in_the_unet_only_and_start_as_a_no_op(preset):
    loaded = FAM.load("tiny")
    before = _unet_out(loaded.model.unet.eval())
    model = apply_lora(loaded.model, FAM, AdapterConfig(preset=preset))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("unet.") and "lora_" in n for n in trainable)
    assert any(".attn2.to_k.lora_A" in n for n in trainable)  # cross-attention to GPT-2 / T5 states
    assert any("time_embedding.linear_1.lora_A" in n for n in trainable) == (preset == "study004")
    assert torch.allclose(before, _unet_out(model.unet.eval()))
    report = trainable_report(model)
    print(f"audioldm2 tiny {preset}: {report}")
    assert 0 < report["trainable_pct"] < 10


def test_lora_training_lowers_the_loss(batch):
    loaded = FAM.load("tiny")
    model = apply_lora(loaded.model, FAM, AdapterConfig(preset="study004", lora_dropout=0.0))
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
    assert end < start - 0.01, (start, end)
    assert all(torch.equal(p, frozen[n]) for n, p in model.unet.named_parameters() if "lora_" not in n)


def test_saved_adapter_loads_in_plain_peft_and_changes_the_output(tiny_dir, tmp_path):
    from diffusers import AudioLDM2UNet2DConditionModel
    from peft import PeftModel

    loaded = FAM.load(tiny_dir)
    model = apply_lora(loaded.model, FAM, AdapterConfig(preset="study004"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    ours = _unet_out(model.unet.eval())
    folder = tmp_path / "adapter"
    FAM.lora_root(model).save_pretrained(str(folder), safe_serialization=True)
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 8
    bare = AudioLDM2UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet").eval()
    assert (ours - _unet_out(bare)).abs().max() > 1e-4
    via_peft = PeftModel.from_pretrained(bare, str(folder))
    assert torch.allclose(_unet_out(via_peft.eval()), ours, atol=1e-6)
    # the shipped example, in a fresh interpreter without musiclora
    import os
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[3] / "examples" / "plain_audioldm2_load.py"
    run = subprocess.run([sys.executable, str(example), tiny_dir, str(folder)], capture_output=True, text=True,
                         timeout=300, check=False, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["max_output_change"] > 1e-4 and report["lora_tensors"] > 0


# --------------------------------------------------------------------------- generation


def test_generate_is_seeded_conditioned_and_sized(tiny_dir):
    loaded = FAM.load(tiny_dir)

    def gen(**kw):
        req = GenerationRequest(prompt=kw.pop("prompt", "calm piano"), duration_s=1.0, steps=3, **kw)
        return FAM.generate(loaded.model, loaded.tokenizer, req)[0]

    a, b = gen(seed=1), gen(seed=1)
    assert a.shape == (SR,) and a.dtype == np.float32 and np.array_equal(a, b) and np.sqrt((a**2).mean()) > 1e-4
    assert not np.allclose(a, gen(seed=2))
    assert not np.allclose(a, gen(seed=1, prompt="epic battle drums"))
    assert not np.allclose(a, gen(seed=1, guidance_scale=1.0))
    assert FAM.generate(loaded.model, loaded.tokenizer, GenerationRequest(prompt="x", duration_s=0.3, steps=2))[1] == SR
    assert FAM.generate(loaded.model, loaded.tokenizer, GenerationRequest(prompt="x", duration_s=0.3, steps=2))[0].shape == (int(0.3 * SR),)
    with pytest.raises(ValueError, match="text only"):
        gen(melody=np.zeros(SR, np.float32), melody_sample_rate=SR)
    with pytest.raises(ValueError, match="duration_s"):
        FAM.generate(loaded.model, loaded.tokenizer, GenerationRequest(prompt="x", duration_s=0.0))


def test_licence_note_names_the_weights_licence():
    assert "CC-BY-NC-SA-4.0" in FAM.licence_note and isinstance(get_family("audioldm").licence_note, str)
    assert isinstance(_container(FAM.load("tiny").model), AudioLDM2)


@pytest.mark.parametrize("guidance", [1.0, 3.5])
def test_sampling_matches_diffusers_audioldm2_pipeline(tiny_dir, guidance):
    """Same initial latents, DDIM steps, guidance, VAE and vocoder: our sampler gives the pipeline's waveform."""
    from diffusers import AudioLDM2Pipeline
    from transformers import GPT2LMHeadModel

    from musiclora.models.audioldm2 import sample_audioldm2

    loaded = FAM.load(tiny_dir)
    prompt = "epic battle drums with strings"
    ours, sr = sample_audioldm2(loaded.model, loaded.tokenizer, prompt, 1.0, guidance_scale=guidance, seed=3, steps=4)
    pipe = AudioLDM2Pipeline.from_pretrained(
        tiny_dir, language_model=GPT2LMHeadModel.from_pretrained(tiny_dir, subfolder="language_model"))
    latents = torch.randn((1, 8, 25, 16), generator=torch.Generator().manual_seed(3))
    ref = pipe(prompt, audio_length_in_s=1.0, num_inference_steps=4, guidance_scale=guidance, latents=latents,
               output_type="np").audios[0]
    assert sr == SR and ours.shape == ref.shape == (SR,)
    assert np.allclose(ours, ref, atol=1e-4 * max(1.0, float(np.abs(ref).max())))
