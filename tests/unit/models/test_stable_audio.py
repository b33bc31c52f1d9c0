"""Stable Audio Open family: tiny preset and folder layout (checked against diffusers' StableAudioPipeline),
stereo shards with timing, the v-objective, LoRA (presets, trainable share, training, plain peft load),
generation."""

import io
import json
import math

import numpy as np
import pytest
import torch

from musiclora.adapters import apply_lora, trainable_report
from musiclora.config import AdapterConfig
from musiclora.models.base import GenerationRequest, Loaded, Segment
from musiclora.models.families import get_family
from musiclora.models.stable_audio import StableAudioFamily, _container
from musiclora.models.stable_audio_components import StableAudio, angles, sampling_times, t5_states

SR = 44100
FAM = get_family("stable-audio-open")


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
    return FAM.save_tiny(str(tmp_path_factory.mktemp("tiny_stable_audio")))


def _tone(freq: float, seconds: float, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def _segments(seconds=4.096, valid_s=(4.096, 1.5)):
    segs = []
    for i, valid_seconds in enumerate(valid_s):
        valid = int(valid_seconds * SR)
        left = np.zeros(int(seconds * SR), np.float32)
        left[:valid] = _tone(220.0 * (i + 1), seconds)[:valid]
        audio = np.stack([left, 0.5 * left]) if i == 0 else left  # one stereo, one mono segment
        segs.append(Segment(f"s{i}", audio, valid, ("calm piano", "epic battle drums")[i],
                            meta={"start_s": 10.0 * i, "track_duration_s": 60.0} if i else {"start_s": 0.0}))
    return segs


def _decode(raw):
    return [{k: (np.load(io.BytesIO(v), allow_pickle=False) if k.endswith(".npy") else v) for k, v in s.items()}
            for s in raw]


@pytest.fixture(scope="module")
def batch(loaded):
    return FAM.collate(_decode(FAM.encode_segments(loaded, _segments())), loaded)


# --------------------------------------------------------------------------- tiny preset and folder layout


def test_tiny_keeps_stable_audio_shapes(loaded):
    m = loaded.model
    assert m.hop_length == 2048 and m.vae.config.audio_channels == 2 and m.vae.config.sampling_rate == SR
    assert m.transformer.config.in_channels == m.vae.config.decoder_input_channels
    assert m.transformer.config.global_states_input_dim == 2 * m.transformer.config.cross_attention_input_dim
    assert m.scheduler_config["prediction_type"] == "v_prediction" and m.scheduler_config["sigma_max"] == 500.0
    assert FAM.channels == 2 and FAM.sample_rate == SR


def test_conditioning_matches_diffusers_stable_audio_pipeline(loaded, tiny_dir):
    """Our DiT call (T5 + timing -> cross / global inputs, rotary) equals the pipeline's, and the folder
    loads with plain diffusers."""
    from diffusers import (
        AutoencoderOobleck,
        EDMDPMSolverMultistepScheduler,
        StableAudioDiTModel,
        StableAudioPipeline,
        StableAudioProjectionModel,
    )
    from diffusers.models.embeddings import get_1d_rotary_pos_embed
    from transformers import AutoTokenizer, T5EncoderModel

    # every component from the folder with its plain class (the hub scheduler class needs torchsde)
    pipe = StableAudioPipeline(
        vae=AutoencoderOobleck.from_pretrained(tiny_dir, subfolder="vae"),
        text_encoder=T5EncoderModel.from_pretrained(tiny_dir, subfolder="text_encoder"),
        projection_model=StableAudioProjectionModel.from_pretrained(tiny_dir, subfolder="projection_model"),
        tokenizer=AutoTokenizer.from_pretrained(tiny_dir, subfolder="tokenizer"),
        transformer=StableAudioDiTModel.from_pretrained(tiny_dir, subfolder="transformer"),
        scheduler=EDMDPMSolverMultistepScheduler())
    model = FAM.load(tiny_dir).model
    with torch.no_grad():
        text = pipe.encode_prompt("calm piano", "cpu", False)
        start, end = pipe.encode_duration(1.0, 3.0, "cpu", False, 1)
        x = torch.randn(1, 4, 20, generator=torch.Generator().manual_seed(0))
        rotary = get_1d_rotary_pos_embed(4, 21, use_real=True, repeat_interleave_real=False)
        ref = pipe.transformer(x, torch.tensor([0.3]), encoder_hidden_states=torch.cat([text, start, end], 1),
                               global_hidden_states=torch.cat([start, end], 2), rotary_embedding=rotary).sample
        t5, mask = t5_states(model.text_encoder, loaded.tokenizer, ["calm piano"])
        ours = model(x, torch.tensor([0.3]), t5, mask, torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([False]))
    assert torch.allclose(ref, ours, atol=1e-5)


def test_skeleton_is_meta_and_gives_the_loaded_feature_spec(loaded, tiny_dir):
    skel = FAM.skeleton(tiny_dir)
    assert next(skel.transformer.parameters()).device.type == "meta"
    spec = FAM.feature_spec(Loaded(skel, None, tiny_dir, FAM.name))
    assert spec == FAM.feature_spec(loaded) and spec["channels"] == 2 and spec["frame_rate"] == SR / 2048


def test_every_parameter_has_a_dimension_so_deepspeed_can_broadcast_it(loaded, tiny_dir):
    """DeepSpeed's engine broadcasts each parameter as bytes (`p.data.view(torch.uint8)`), which fails on a
    0-dim tensor (e.g. ClapModel's logit scales): the training container must hold none."""
    for model in (loaded.model, FAM.load(tiny_dir).model):
        assert not [n for n, p in model.named_parameters() if p.dim() == 0]


def test_unreadable_base_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot load Stable Audio Open component 'transformer'"):
        FAM.load(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="transformer config"):
        FAM.skeleton(str(tmp_path / "nowhere"))


# --------------------------------------------------------------------------- shards and loss


def test_encode_segments_stereo_timing_and_collate(loaded):
    segs = _segments()
    dec = _decode(FAM.encode_segments(loaded, segs))
    frames = math.ceil(4.096 * SR / 2048)
    assert dec[0]["latents.npy"].shape == (4, frames) and dec[0]["latents.npy"].dtype == np.float16
    assert [d["json"]["num_frames"] for d in dec] == [frames, math.ceil(1.5 * SR / 2048)]
    assert dec[0]["json"]["seconds_start"] == 0.0
    assert dec[0]["json"]["seconds_total"] == pytest.approx(4.096, abs=1e-4)  # no track length: the segment's end
    assert (dec[1]["json"]["seconds_start"], dec[1]["json"]["seconds_total"]) == (10.0, 60.0)
    # the stereo image reaches the latents: a mono copy of the left channel encodes differently
    mono = Segment("m", segs[0].audio[0], segs[0].num_valid, "calm piano")
    assert not np.allclose(_decode(FAM.encode_segments(loaded, [mono]))[0]["latents.npy"], dec[0]["latents.npy"])
    with pytest.raises(ValueError, match=r"mono \[L\] or stereo \[2, L\]"):
        FAM.encode_segments(loaded, [Segment("x", np.zeros((3, SR), np.float32), SR, "c")])
    b = FAM.collate(dec, loaded)
    assert b["t5"].shape == (2, 32, 32) and b["t5_mask"].sum(1).tolist() == [d["t5.npy"].shape[0] for d in dec]
    assert b["valid"].sum(1).tolist() == [frames, math.ceil(1.5 * SR / 2048)]
    assert b["seconds_total"].tolist() == [pytest.approx(4.096, abs=1e-4), 60.0]


def test_v_target_denoises_to_x0_as_the_sampler_reads_it():
    """alpha x_t - sigma v = x0: the loss's target is what the sampler's x0 estimate inverts."""
    x0, eps, t = torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.rand(3)
    a, s = (v[:, None, None] for v in angles(t))
    xt, v = a * x0 + s * eps, a * eps - s * x0
    assert torch.allclose(a * xt - s * v, x0, atol=1e-5) and torch.allclose(s * xt + a * v, eps, atol=1e-5)
    times = sampling_times({"sigma_min": 0.3, "sigma_max": 500.0}, 10)
    assert times[0] == pytest.approx(math.atan(500.0) * 2 / math.pi) and times[-1] == 0 and (times.diff() < 0).all()


class _Oracle(torch.nn.Module):
    """Knows x0: returns the exact v for x_t = alpha x0 + sigma eps (and records the null flags).
    Wraps the tiny model like a DeepSpeed engine (`module`), whose forward it replaces."""

    def __init__(self, x0, inner):
        super().__init__()
        self.x0, self.nulls, self.module = x0, [], inner

    def forward(self, x, t, t5, mask, start, total, null):
        self.nulls.append(null)
        a, s = (v[:, None, None] for v in angles(t))
        eps = (x - a * self.x0) / s.clamp_min(1e-4)
        return a * eps - s * self.x0


def test_loss_is_the_v_objective_with_padding_masked(loaded, batch):
    oracle = _Oracle(batch["latents"], loaded.model)
    assert FAM.loss(oracle, batch).item() < 1e-4
    padded = dict(batch, latents=batch["latents"].clone())
    padded["latents"][1, :, 40:] += 5.0  # beyond sample 1's 33 valid frames: the oracle is wrong only there
    assert FAM.loss(oracle, padded).item() < 1e-4
    changed = dict(batch, latents=batch["latents"].clone())
    changed["latents"][1, :, :30] += 5.0
    assert FAM.loss(oracle, changed).item() > 1e-2


def test_caption_dropout_nulls_the_cross_attention_input_only_while_training(loaded, batch):
    model = loaded.model
    torch.manual_seed(0)
    base = FAM.loss(model.eval(), batch)
    assert torch.isfinite(base) and base.dtype == torch.float32
    oracle = _Oracle(batch["latents"], model)
    dropping = StableAudioFamily({"caption_dropout": 0.999})
    dropping.loss(oracle.train(), batch)
    assert oracle.nulls[-1].all()
    dropping.loss(oracle.eval(), batch)
    assert not oracle.nulls[-1].any()
    with pytest.raises(ValueError, match="model.options.caption_dropout"):
        StableAudioFamily({"caption_dropout": -0.1})


def test_container_is_found_under_wrappers(loaded):
    class Engine(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert _container(Engine(loaded.model)) is loaded.model
    with pytest.raises(TypeError, match="StableAudio"):
        _container(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------- LoRA


def _dit_out(model: StableAudio, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, t5 = torch.randn(1, 4, 16, generator=g), torch.randn(1, 32, 32, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([0.5]), t5, torch.ones(1, 32, dtype=torch.long), torch.tensor([0.0]),
                     torch.tensor([4.0]), torch.tensor([False]))


@pytest.mark.parametrize("preset, ff", [("study002", True), ("attn", False)])
def test_presets_put_lora_in_the_dit_only_and_start_as_a_no_op(preset, ff):
    loaded = FAM.load("tiny")
    before = _dit_out(loaded.model)
    model = apply_lora(loaded.model, FAM, AdapterConfig(preset=preset))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("transformer.") and "lora_" in n for n in trainable)
    assert any(".attn2.to_k.lora_A" in n for n in trainable)
    assert any("ff.net.2.lora_A" in n for n in trainable) == ff
    assert torch.allclose(before, _dit_out(model))
    report = trainable_report(model)
    print(f"stable-audio-open tiny {preset}: {report}")
    assert 0 < report["trainable_pct"] < 50


def test_lora_training_lowers_the_loss(batch):
    loaded = FAM.load("tiny")
    model = apply_lora(loaded.model, FAM, AdapterConfig(preset="study002", lora_dropout=0.0))
    frozen = {n: p.clone() for n, p in model.transformer.named_parameters() if "lora_" not in n}

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
    assert all(torch.equal(p, frozen[n]) for n, p in model.transformer.named_parameters() if "lora_" not in n)


def test_saved_adapter_loads_in_plain_peft_and_changes_the_output(tiny_dir, tmp_path):
    from diffusers import StableAudioDiTModel
    from peft import PeftModel

    loaded = FAM.load(tiny_dir)
    model = apply_lora(loaded.model, FAM, AdapterConfig(preset="study002"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    ours = _dit_out(model.eval())
    folder = tmp_path / "adapter"
    FAM.lora_root(model).save_pretrained(str(folder), safe_serialization=True)
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 8
    fresh = FAM.load(tiny_dir).model
    base = _dit_out(fresh)
    assert (ours - base).abs().max() > 1e-4
    fresh.transformer = PeftModel.from_pretrained(StableAudioDiTModel.from_pretrained(tiny_dir, subfolder="transformer"),
                                                  str(folder)).eval()
    assert torch.allclose(_dit_out(fresh), ours, atol=1e-6)
    # the shipped example, in a fresh interpreter without musiclora
    import os
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[3] / "examples" / "plain_stable_audio_load.py"
    run = subprocess.run([sys.executable, str(example), tiny_dir, str(folder)], capture_output=True, text=True,
                         timeout=300, check=False, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["max_output_change"] > 1e-4 and report["lora_tensors"] > 0


# --------------------------------------------------------------------------- generation


def test_generate_is_seeded_conditioned_and_sized(tiny_dir):
    from musiclora.models.stable_audio import sample_stable_audio

    loaded = FAM.load(tiny_dir)

    def gen(**kw):
        req = GenerationRequest(prompt=kw.pop("prompt", "calm piano"), duration_s=1.0, steps=3, **kw)
        return FAM.generate(loaded.model, loaded.tokenizer, req)[0]

    a, b = gen(seed=1), gen(seed=1)
    assert a.shape == (2, SR) and a.dtype == np.float32 and np.array_equal(a, b) and np.sqrt((a**2).mean()) > 1e-4
    assert not np.allclose(a, gen(seed=2))
    assert not np.allclose(a, gen(seed=1, prompt="epic battle drums"))
    assert not np.allclose(a, gen(seed=1, guidance_scale=1.0))
    stereo, sr = sample_stable_audio(loaded.model, loaded.tokenizer, "calm piano", 1.0,
                                     guidance_scale=GenerationRequest(prompt="x").guidance_scale, seed=1, steps=3)
    assert sr == SR and np.array_equal(stereo, a)  # the family's stereo, not a downmix
    assert not np.allclose(a[0], a[1])  # two channels of their own
    with pytest.raises(ValueError, match="DiT window"):
        FAM.generate(loaded.model, loaded.tokenizer, GenerationRequest(prompt="x", duration_s=60.0))
    with pytest.raises(ValueError, match="text only"):
        gen(melody=np.zeros(SR, np.float32), melody_sample_rate=SR)


def test_licence_note_names_the_community_license():
    assert "Stability AI Community License" in FAM.licence_note


def test_musiclora_generate_with_an_adapter_writes_44k_stereo(tiny_dir, tmp_path):
    """`musiclora generate`'s function on a saved adapter (card names family and base): no family branch needed;
    the WAV holds the family's two channels (soundfile reads [L, C])."""
    import soundfile as sf

    from musiclora.adapters import save_adapter
    from musiclora.generate import generate

    model = apply_lora(FAM.load(tiny_dir).model, FAM, AdapterConfig(preset="study002"))
    folder = str(tmp_path / "adapter")
    save_adapter(FAM.lora_root(model), folder, card={"family": FAM.name, "base_model": tiny_dir})
    out = generate("calm piano", str(tmp_path / "out.wav"), adapter=folder, duration_s=1.0, steps=2)
    audio, rate = sf.read(out["wav"], dtype="float32")
    assert out["family"] == "stable-audio-open" and rate == SR and audio.shape == (SR, 2) and out["rms"] > 0
    assert out["channels"] == 2 and out["duration_s"] == 1.0 and np.abs(audio[:, 0] - audio[:, 1]).max() > 1e-3
