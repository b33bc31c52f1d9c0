"""AudioLDM family: log-mel front end, tiny preset and folder layout, shards, options, loss."""

import io
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from musiclora.models.audioldm import AudioLDMFamily, _container
from musiclora.models.audioldm_components import (
    AudioLDM,
    mel_basis,
    normalize_waveform,
    waveform_to_log_mel,
)
from musiclora.models.base import Loaded, Segment
from musiclora.models.families import get_family

SR = 16000



@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

@pytest.fixture(scope="module")
def fam():
    return get_family("audioldm")


@pytest.fixture(scope="module")
def loaded(fam):
    return fam.load("tiny")


@pytest.fixture(scope="module")
def tiny_dir(fam, tmp_path_factory):
    return fam.save_tiny(str(tmp_path_factory.mktemp("tiny_audioldm")))


def _tone(freq: float, seconds: float, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def _segments(n=2, seconds=2.56, valid_s=(2.56, 1.2), captions=("calm piano", "epic battle drums")):
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


# --------------------------------------------------------------------------- front end


def test_log_mel_matches_librosa_and_audioldm_scale():
    import librosa

    wav = _tone(440.0, 1.0)
    mel = waveform_to_log_mel(torch.from_numpy(wav)[None])
    assert mel.shape == (1, SR // 160, 64) and mel.dtype == torch.float32  # 100 frames/s, 64 bands
    spec = np.abs(librosa.stft(wav, n_fft=1024, hop_length=160, win_length=1024, window="hann", center=True,
                               pad_mode="reflect"))
    ref = np.log(np.maximum(mel_basis().numpy() @ spec, 1e-5))[:, : SR // 160].T
    assert np.allclose(np.exp(mel[0].numpy()), np.exp(ref), rtol=1e-3, atol=1e-6)  # float32 noise near the floor
    # the loudest band holds 440 Hz, silence sits at ln(1e-5)
    centres = librosa.mel_frequencies(n_mels=66, fmin=0, fmax=8000)[1:-1]
    assert abs(centres[int(mel[0].mean(0).argmax())] - 440) < 80
    silent = waveform_to_log_mel(torch.zeros(1, 4096))
    assert torch.allclose(silent, torch.full_like(silent, math.log(1e-5)))
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        waveform_to_log_mel(torch.zeros(4096))


def test_normalize_waveform_centres_and_scales_peak_to_half():
    y = normalize_waveform(np.array([0.1, 0.3, 0.5], np.float32))
    assert abs(y.mean()) < 1e-7 and np.isclose(np.abs(y).max(), 0.5, atol=1e-6)
    assert not normalize_waveform(np.zeros(10, np.float32)).any()


# --------------------------------------------------------------------------- tiny preset and folder layout


def test_tiny_keeps_audioldm_shapes(loaded):
    m = loaded.model
    assert m.vae_scale_factor == 4 and m.vae.config.latent_channels == m.unet.config.in_channels == 8
    assert int(np.prod(m.vocoder.config.upsample_rates)) == 160 and m.vocoder.config.model_in_dim == 64
    assert m.unet.config.class_embed_type == "simple_projection" and m.unet.config.class_embeddings_concat
    dim = m.unet.config.projection_class_embeddings_input_dim
    assert m.text_encoder.config.projection_dim == dim == m.extras["uncond"].numel()
    assert m.scheduler.config.prediction_type == "epsilon" and m.scheduler.config.beta_start == 0.0015


def test_tiny_folder_loads_with_plain_diffusers_and_transformers(fam, loaded, tiny_dir):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, ClapModel, ClapTextModelWithProjection, SpeechT5HifiGan

    with open(f"{tiny_dir}/model_index.json") as f:
        index = json.load(f)
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vocoder"][1] == "SpeechT5HifiGan"
    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    AutoencoderKL.from_pretrained(tiny_dir, subfolder="vae")
    DDIMScheduler.from_pretrained(tiny_dir, subfolder="scheduler")
    SpeechT5HifiGan.from_pretrained(tiny_dir, subfolder="vocoder")
    ClapModel.from_pretrained(tiny_dir, subfolder="audio_encoder")
    text = ClapTextModelWithProjection.from_pretrained(tiny_dir, subfolder="text_encoder")
    tok = AutoTokenizer.from_pretrained(tiny_dir, subfolder="tokenizer")
    for k, v in loaded.model.unet.state_dict().items():
        assert torch.equal(unet.state_dict()[k], v), k
    ids = tok(["calm piano"], return_tensors="pt")
    with torch.no_grad():
        ours = loaded.model.text_encoder(**ids).text_embeds
        assert torch.allclose(text(**ids).text_embeds, ours)
    again = fam.load(tiny_dir)
    assert torch.allclose(again.model.extras["uncond"], loaded.model.extras["uncond"])


def test_tiny_text_and_audio_towers_share_one_clap(loaded):
    """The text encoder is the tiny ClapModel's text tower: its embedding points where get_text_features does."""
    clap = loaded.model.extras["clap_audio"].model
    ids = loaded.tokenizer(["epic battle drums"], return_tensors="pt")
    with torch.no_grad():
        ours = loaded.model.text_encoder(**ids).text_embeds
        feats = clap.get_text_features(**ids)
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    norm = torch.nn.functional.normalize
    assert torch.allclose(norm(ours, dim=-1), norm(feats, dim=-1), atol=1e-5)


def test_skeleton_feature_spec_equals_the_loaded_one(fam, loaded, tiny_dir):
    """The trainer's preflight compares the skeleton's spec with the manifest's: they must agree."""
    skel = fam.skeleton(tiny_dir)
    assert next(skel.unet.parameters()).device.type == "meta"
    spec = fam.feature_spec(Loaded(skel, None, tiny_dir, fam.name))
    assert spec == fam.feature_spec(loaded)
    assert spec["frame_rate"] == 25.0 and spec["latent_channels"] == 8


def test_unreadable_base_is_a_clear_error(fam, tmp_path):
    with pytest.raises(ValueError, match="cannot load AudioLDM component 'unet'"):
        fam.load(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unet config"):
        fam.skeleton(str(tmp_path / "nowhere"))


# --------------------------------------------------------------------------- shards and options


def test_encode_segments_fields(loaded):
    dec = _decode(AudioLDMFamily({"condition": "audio"}).encode_segments(loaded, _segments()))
    assert dec[0]["latents.npy"].shape == (8, 64, 16) and dec[0]["latents.npy"].dtype == np.float16
    assert [d["json"]["num_frames"] for d in dec] == [64, math.ceil(1.2 * SR / 160 / 4)]
    for field in ("clap_text.npy", "clap_audio.npy"):
        assert dec[0][field].shape == (16,) and np.isclose(np.linalg.norm(dec[0][field]), 1.0, atol=1e-5)
        assert not np.allclose(dec[0][field], dec[1][field])  # caption / clip dependent
    assert dec[0]["json"]["audio_embed_source"] == "clip"


def test_text_conditioning_computes_no_audio_embeddings(loaded, monkeypatch):
    fam = AudioLDMFamily({"condition": "text"})
    monkeypatch.setattr(fam, "clap_audio", lambda model: pytest.fail("CLAP audio tower used for text conditioning"))
    dec = _decode(fam.encode_segments(loaded, _segments()))
    assert "clap_audio.npy" not in dec[0] and dec[0]["json"]["audio_embed_source"] == "none"
    with pytest.raises(ValueError, match="re-run prepare with model_options.condition: audio"):
        AudioLDMFamily({"condition": "audio"}).collate(dec, loaded)


def test_audio_conditioning_needs_the_bases_own_clap_audio_tower(tmp_path):
    """A base folder without audio_encoder/ fails clearly; no other CLAP is substituted."""
    import shutil

    from musiclora.models.audioldm_components import load_clap_audio

    folder = tmp_path / "tiny_audioldm"
    get_family("audioldm").save_tiny(str(folder))
    assert load_clap_audio({"base": str(folder)}).name == f"clap-audio:{folder}"
    shutil.rmtree(folder / "audio_encoder")
    with pytest.raises(ValueError, match="model.options.clap_audio"):
        load_clap_audio({"base": str(folder)})
    other = tmp_path / "clap"
    get_family("audioldm").load("tiny").model.extras["clap_audio"].model.save_pretrained(str(other))
    get_family("audioldm").load("tiny").model.extras["clap_audio"].feature_extractor.save_pretrained(str(other))
    assert load_clap_audio({"base": str(folder)}, str(other)).name == f"clap-audio:{other}"


def test_paired_conditioning_clip_replaces_the_clip_embedding(loaded, tmp_path):
    import soundfile as sf

    fam = AudioLDMFamily({"condition": "audio"})
    seg = _segments(n=1)[0]
    vocal = tmp_path / "vocal.wav"
    sf.write(vocal, np.concatenate([np.zeros(SR, np.float32), _tone(880.0, 3.0)]), SR, subtype="FLOAT")
    paired = Segment(seg.key, seg.audio, seg.num_valid, seg.caption, meta={"cond_audio": str(vocal), "start_s": 1.0})
    own, other = _decode(fam.encode_segments(loaded, [seg, paired]))
    expected = fam.clap_audio(loaded.model)([_tone(880.0, 3.0)[: seg.num_valid]])[0]
    assert other["json"]["audio_embed_source"] == f"cond_audio:{vocal}"
    assert np.allclose(other["clap_audio.npy"], expected, atol=1e-4)
    assert not np.allclose(own["clap_audio.npy"], other["clap_audio.npy"])
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(4 * SR, np.float32), SR)
    with pytest.raises(ValueError, match="silent"):
        fam.encode_segments(loaded, [Segment("x", seg.audio, seg.num_valid, "c", meta={"cond_audio": str(silent)})])


def test_collate_picks_the_condition_named_by_options(loaded):
    dec = _decode(AudioLDMFamily({"condition": "audio"}).encode_segments(loaded, _segments()))
    text = AudioLDMFamily({"condition": "text"}).collate(dec, loaded)
    audio = AudioLDMFamily({"condition": "audio"}).collate(dec, loaded)
    assert text["latents"].shape == (2, 8, 64, 16) and text["latents"].dtype == torch.float32
    assert text["valid"].sum(1).tolist() == [64, 30]
    assert torch.equal(text["cond"], torch.from_numpy(np.stack([d["clap_text.npy"] for d in dec])))
    assert torch.equal(audio["cond"], torch.from_numpy(np.stack([d["clap_audio.npy"] for d in dec])))
    assert torch.allclose(text["uncond"][1], loaded.model.extras["uncond"])


def test_options_are_validated_with_the_key_named():
    with pytest.raises(ValueError, match="model.options.caption_dropout"):
        AudioLDMFamily({"caption_dropout": 1.5})
    with pytest.raises(ValueError, match="model.options.drop"):
        AudioLDMFamily().configure({"drop": 0.1})
    assert AudioLDMFamily().configure({"condition": "audio"}).options.condition == "audio"
    with pytest.raises(ValueError, match="model.options.caption_dropout"):  # MusicGen's options are its own
        get_family("musicgen-melody").configure({"caption_dropout": 0.1})


# --------------------------------------------------------------------------- loss


class _Oracle(nn.Module):
    """A stand-in UNet that knows x0 and returns the exact epsilon or v target for x_t."""

    def __init__(self, x0, alphas_cumprod, kind):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.x0, self.acp, self.kind, self.labels = x0, alphas_cumprod, kind, []
        self.config = type("C", (), {"in_channels": 8})()

    def forward(self, sample, timestep, encoder_hidden_states=None, class_labels=None):
        self.labels.append(class_labels)
        a = self.acp[timestep].view(-1, 1, 1, 1)
        eps = (sample - a.sqrt() * self.x0) / (1 - a).sqrt()
        out = eps if self.kind == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * self.x0
        return type("O", (), {"sample": out + 0 * self.w})()


def _oracle_model(loaded, kind, batch):
    from diffusers import DDIMScheduler

    m = loaded.model
    sched = DDIMScheduler.from_config(m.scheduler.config, prediction_type=kind)
    x0 = batch["latents"] * m.vae.config.scaling_factor
    return AudioLDM(_Oracle(x0, sched.alphas_cumprod, kind), m.vae, None, None, sched)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_loss_target_follows_the_scheduler_prediction_type(fam, loaded, kind):
    batch = AudioLDMFamily().collate(_decode(fam.encode_segments(loaded, _segments())), loaded)
    right = _oracle_model(loaded, kind, batch)
    assert fam.loss(right, batch).item() < 1e-8
    wrong = _oracle_model(loaded, "epsilon" if kind == "v_prediction" else "v_prediction", batch)
    wrong.scheduler = right.scheduler  # model predicts the other quantity
    assert fam.loss(wrong, batch).item() > 1e-3


def test_loss_ignores_padded_frames(fam, loaded):
    batch = AudioLDMFamily().collate(_decode(fam.encode_segments(loaded, _segments())), loaded)
    model = _oracle_model(loaded, "epsilon", batch)  # exact on `batch`'s clean latents
    padded = dict(batch, latents=batch["latents"].clone())
    padded["latents"][1, :, 30:] += 5.0  # beyond sample 1's 30 valid latent frames: the oracle is now wrong there
    loss = fam.loss(model, padded)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.item() < 1e-8
    valid = dict(batch, latents=batch["latents"].clone())
    valid["latents"][1, :, :30] += 5.0
    assert fam.loss(model, valid).item() > 1e-3


def test_caption_dropout_only_while_training(fam, loaded):
    batch = AudioLDMFamily().collate(_decode(fam.encode_segments(loaded, _segments())), loaded)
    model = _oracle_model(loaded, "epsilon", batch)
    dropping = AudioLDMFamily({"caption_dropout": 0.999})
    torch.manual_seed(0)
    dropping.loss(model.train(), batch)
    assert torch.allclose(model.unet.labels[-1], batch["uncond"])
    dropping.loss(model.eval(), batch)
    assert torch.allclose(model.unet.labels[-1], batch["cond"])


def test_container_is_found_under_wrappers(loaded):
    class Engine(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert _container(Engine(loaded.model)) is loaded.model
    with pytest.raises(TypeError, match="AudioLDM"):
        _container(nn.Linear(2, 2))


def test_check_shards_refuses_audio_conditioning_on_text_only_shards(loaded):
    text_spec = AudioLDMFamily({"condition": "text"}).feature_spec(loaded)
    audio_spec = AudioLDMFamily({"condition": "audio"}).feature_spec(loaded)
    assert "clap_audio.npy" not in text_spec["fields"] and "clap_audio.npy" in audio_spec["fields"]
    AudioLDMFamily({"condition": "audio"}).check_shards(audio_spec)
    AudioLDMFamily({"condition": "text"}).check_shards(text_spec)
    with pytest.raises(ValueError, match="condition: audio"):
        AudioLDMFamily({"condition": "audio"}).check_shards(text_spec)
