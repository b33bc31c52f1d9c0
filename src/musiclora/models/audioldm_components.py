"""AudioLDM's parts without its (deprecated) diffusers pipeline: the model container, the log-mel
front end, CLAP embeddings, and loading/saving the `cvssp/audioldm-s-full-v2` folder layout.

The folder layout is diffusers' (one `save_pretrained` folder per component, `model_index.json`
on top), so a folder written here loads with the plain classes and `load_audioldm` reads the hub
checkpoint the same way:

    model_index.json
    unet/           diffusers UNet2DConditionModel (class-embedding conditioning, no cross-attention input)
    vae/            diffusers AutoencoderKL over the log-mel "image" [B, 1, T, 64]
    text_encoder/   transformers ClapTextModelWithProjection
    tokenizer/      the CLAP text tokenizer (RoBERTa BPE)
    vocoder/        transformers SpeechT5HifiGan (log-mel [B, T, 64] -> 16 kHz waveform)
    scheduler/      diffusers DDIMScheduler config
    audio_encoder/  transformers ClapModel whose audio tower embeds clips (musiclora's addition;
    feature_extractor/  its ClapFeatureExtractor)  absent from the hub folder: see CLAP_AUDIO_HINT
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 16_000
"""AudioLDM's audio rate in Hz."""
N_FFT = 1024
WIN_LENGTH = 1024
HOP_LENGTH = 160
"""STFT hop in samples: 100 mel frames per second at 16 kHz."""
N_MELS = 64
FMIN, FMAX = 0.0, 8000.0
LOG_FLOOR = 1e-5
"""Magnitudes are clamped to this before the log (AudioLDM's `dynamic_range_compression`)."""

CLAP_AUDIO_HINT = (
    "AudioLDM's audio conditioning needs the CLAP audio tower its UNet was trained against (the one paired with "
    "the base's text_encoder); put it into <base>/audio_encoder (+ feature_extractor/) or name it with "
    "model.options.clap_audio (a hub id or folder). No other CLAP is substituted: its audio space would not "
    "match the text encoder's"
)

COMPONENTS = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "ClapTextModelWithProjection"),
    "tokenizer": ("transformers", "RobertaTokenizerFast"),
    "vocoder": ("transformers", "SpeechT5HifiGan"),
    "scheduler": ("diffusers", "DDIMScheduler"),
}
"""The `model_index.json` entries of the hub layout (what AudioLDMPipeline.from_pretrained reads)."""


class AudioLDM(nn.Module):
    """The AudioLDM components as one module; `forward` is the UNet's noise (or v) prediction.

    The training loop wraps this module in DeepSpeed and calls it, so the UNet runs inside the
    engine's forward; LoRA goes into `unet` (the family's `lora_root_attr`).

    Attributes:
        unet: diffusers `UNet2DConditionModel`, `class_embed_type="simple_projection"`.
        vae: diffusers `AutoencoderKL` (None in a skeleton).
        text_encoder: transformers `ClapTextModelWithProjection` (None in a skeleton).
        vocoder: transformers `SpeechT5HifiGan` (None in a skeleton).
        scheduler: a diffusers scheduler (not a module; DDIM for the hub checkpoint).
        extras: things that are not sub-modules (so DeepSpeed, `.to()` and LoRA leave them alone):
            `clap_audio` (lazily loaded `ClapAudioEmbedder`), `uncond` (float32 [D] CLAP text
            embedding of the empty prompt), `source` ({"base", "revision"}).
    """

    def __init__(self, unet: nn.Module, vae=None, text_encoder=None, vocoder=None, scheduler=None):
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.vocoder = vocoder
        self.scheduler = scheduler
        self.extras: dict[str, Any] = {}

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """UNet prediction for noisy latents.

        Args:
            sample: noisy latents, shape [B, C, T', F'] (T' = mel frames / 4, F' = 64 / 4 for AudioLDM).
            timestep: int64 diffusion steps, shape [B].
            class_labels: CLAP embeddings, shape [B, D]; enter through the UNet's class embedding
                (`simple_projection`, concatenated to the time embedding), as AudioLDM conditions.

        Returns:
            the prediction (epsilon or v, per the scheduler's `prediction_type`), shape of `sample`.
        """
        return self.unet(sample, timestep, encoder_hidden_states=None, class_labels=class_labels).sample

    @property
    def vae_scale_factor(self) -> int:
        """Down-sampling of the VAE along time and frequency (4 for audioldm-s-full-v2)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


# --------------------------------------------------------------------------- log-mel front end


def mel_basis() -> torch.Tensor:
    """Slaney mel filter bank, float32 [64, 513] (librosa.filters.mel, as AudioLDM's TacotronSTFT)."""
    import librosa

    return torch.from_numpy(
        librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX)
    ).float()


def normalize_waveform(wav: np.ndarray) -> np.ndarray:
    """AudioLDM's input normalisation: remove the mean, then scale the peak to 0.5.

    Source: AudioLDM `audioldm/audio/tools.py` (`normalize_wav`). Returns float32 [L]; an
    all-zero input stays zero.
    """
    wav = np.asarray(wav, np.float32)
    wav = wav - wav.mean()
    return (wav / (np.abs(wav).max() + 1e-8) * 0.5).astype(np.float32)


def waveform_to_log_mel(wav: torch.Tensor, basis: torch.Tensor | None = None) -> torch.Tensor:
    """Log-magnitude mel spectrogram as AudioLDM computes it.

    Hann-windowed STFT (n_fft 1024, window 1024, hop 160, centred with reflect padding) ->
    magnitude -> 64 Slaney mel bands 0-8 kHz -> ln(max(x, 1e-5)). Source: AudioLDM
    `audioldm/audio/stft.py` (`TacotronSTFT.mel_spectrogram`); the vocoder inverts this scale.

    Args:
        wav: float waveforms at 16 kHz, shape [B, L].
        basis: the mel filter bank from `mel_basis()` (built when None).

    Returns:
        float32 log-mel, shape [B, T, 64] with T = L // 160 frames (100 per second).

    Raises:
        ValueError: `wav` is not [B, L] or is shorter than one window (1024 samples).
    """
    if wav.dim() != 2 or wav.shape[-1] < N_FFT:
        raise ValueError(f"wav must be [B, L] with L >= {N_FFT} samples at 16 kHz; got shape {tuple(wav.shape)}")
    basis = mel_basis() if basis is None else basis
    spec = torch.stft(
        wav.float(), N_FFT, HOP_LENGTH, WIN_LENGTH, torch.hann_window(WIN_LENGTH), center=True,
        pad_mode="reflect", return_complex=True,
    ).abs()  # [B, 513, L // 160 + 1]
    mel = torch.log(torch.clamp(basis @ spec, min=LOG_FLOOR))
    return mel[:, :, : wav.shape[-1] // HOP_LENGTH].transpose(1, 2).contiguous()


def pad_frames(mel: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad log-mel [B, T, F] along T to a multiple of `multiple` with the silence value ln(1e-5)."""
    extra = (-mel.shape[1]) % multiple
    return F.pad(mel, (0, 0, 0, extra), value=math.log(LOG_FLOOR)) if extra else mel


def mel_frames_for(duration_s: float, multiple: int) -> int:
    """Mel frames covering `duration_s` seconds, rounded up to a multiple of the VAE factor."""
    frames = max(1, math.ceil(duration_s * SAMPLE_RATE / HOP_LENGTH))
    return math.ceil(frames / multiple) * multiple


# --------------------------------------------------------------------------- CLAP


def max_text_tokens(tokenizer) -> int:
    """Token limit for captions: the tokenizer's `model_max_length`, at most RoBERTa's 512."""
    return int(min(getattr(tokenizer, "model_max_length", 512) or 512, 512))


@torch.no_grad()
def clap_text_embeddings(text_encoder: nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    """CLAP text embeddings as AudioLDM's conditioning: `text_embeds`, L2-normalised.

    Source: diffusers `AudioLDMPipeline._encode_prompt` (text_embeds then F.normalize).

    Args:
        text_encoder: `ClapTextModelWithProjection`.
        tokenizer: its tokenizer; texts are padded and truncated to `max_text_tokens`.
        texts: the captions (an empty string gives the unconditional embedding).

    Returns:
        float32 [N, D] on the CPU, unit L2 norm.
    """
    tokens = tokenizer(list(texts), padding=True, truncation=True, max_length=max_text_tokens(tokenizer),
                       return_tensors="pt")
    device = next(text_encoder.parameters()).device
    out = text_encoder(input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device))
    return F.normalize(out.text_embeds.float(), dim=-1).cpu()


def clap_audio_embeddings(embedder, wavs: list[np.ndarray]) -> torch.Tensor:
    """CLAP audio embeddings of 16 kHz clips, resampled to the CLAP extractor's rate first.

    Args:
        embedder: `musiclora.eval.embeddings.ClapAudioEmbedder` (windows long clips, averages,
            L2-normalises; deterministic).
        wavs: float32 mono clips [L_i] at 16 kHz.

    Returns:
        float32 [N, D], unit L2 norm.
    """
    from musiclora.audio import resample

    clips = [resample(np.asarray(w, np.float32), SAMPLE_RATE, embedder.sample_rate) for w in wavs]
    return torch.from_numpy(embedder(clips))


# --------------------------------------------------------------------------- folder layout


def load_audioldm(base: str, dtype: torch.dtype = torch.float32, revision: str | None = None):
    """Load every component of a folder or hub id in the `cvssp/audioldm-s-full-v2` layout.

    Args:
        base: hub id or local folder (see the module docstring for the layout).
        dtype: parameter dtype of the modules.
        revision: hub revision (branch, tag or commit).

    Returns:
        (`AudioLDM` in eval mode, tokenizer).

    Raises:
        ValueError: a component is missing or cannot be read (names the component and the base).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, ClapTextModelWithProjection, SpeechT5HifiGan

    loaders = {
        "unet": lambda: UNet2DConditionModel.from_pretrained(base, subfolder="unet", revision=revision),
        "vae": lambda: AutoencoderKL.from_pretrained(base, subfolder="vae", revision=revision),
        "text_encoder": lambda: ClapTextModelWithProjection.from_pretrained(
            base, subfolder="text_encoder", revision=revision),
        "vocoder": lambda: SpeechT5HifiGan.from_pretrained(base, subfolder="vocoder", revision=revision),
        "scheduler": lambda: DDIMScheduler.from_pretrained(base, subfolder="scheduler", revision=revision),
        "tokenizer": lambda: AutoTokenizer.from_pretrained(base, subfolder="tokenizer", revision=revision),
    }
    parts: dict[str, Any] = {}
    for name, load in loaders.items():
        try:
            parts[name] = load()
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"cannot load AudioLDM component {name!r} from {base!r}: expected 'tiny', a folder or hub id in the "
                f"cvssp/audioldm-s-full-v2 layout with {name}/ ({exc})"
            ) from exc
    model = AudioLDM(parts["unet"], parts["vae"], parts["text_encoder"], parts["vocoder"], parts["scheduler"])
    model.extras["source"] = {"base": base, "revision": revision}
    return model.to(dtype).eval(), parts["tokenizer"]


def audioldm_skeleton(base: str, revision: str | None = None) -> AudioLDM:
    """UNet and VAE module trees from `<base>/{unet,vae}/config.json` on the meta device (no weights
    read): enough to check LoRA targets and the feature spec before any worker starts.

    Raises:
        ValueError: a config cannot be read (names it).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    configs = {}
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        try:
            configs[name] = cls.load_config(base, subfolder=name, revision=revision)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the {name} config of AudioLDM base {base!r} ({name}/config.json) ({exc})") from exc
    with torch.device("meta"):
        return AudioLDM(UNet2DConditionModel.from_config(configs["unet"]), AutoencoderKL.from_config(configs["vae"]))


def load_clap_audio(source: dict[str, Any], clap_audio: str | None = None):
    """The CLAP audio embedder of a loaded base: `<base>/audio_encoder` when the folder or repository
    ships it, else the checkpoint the user names in `clap_audio` (`model.options.clap_audio`).

    Args:
        source: {"base": hub id or folder, "revision": ...} of the loaded base.
        clap_audio: explicit CLAP checkpoint (hub id or folder) whose audio tower matches the base.

    Returns:
        `musiclora.models.clap.ClapAudioEmbedder`.

    Raises:
        ValueError: neither exists; the message names what was tried and how to fix it (no other
            CLAP is silently substituted).
    """
    from transformers import ClapFeatureExtractor, ClapModel

    from musiclora.models.clap import ClapAudioEmbedder

    base, revision = source.get("base"), source.get("revision")
    errors = []
    for where, sub, rev in ((base, "audio_encoder", revision), (clap_audio, None, None)):
        if where is None:
            continue
        try:
            fe_sub = "feature_extractor" if sub else None
            model = ClapModel.from_pretrained(where, subfolder=sub or "", revision=rev).eval()
            extractor = ClapFeatureExtractor.from_pretrained(where, subfolder=fe_sub or "", revision=rev)
            return ClapAudioEmbedder(model, extractor, name=f"clap-audio:{where}")
        except (OSError, ValueError) as exc:
            errors.append(f"{where}{'/' + sub if sub else ''}: {exc}")
    raise ValueError(f"no CLAP audio encoder for AudioLDM base {base!r} ({'; '.join(errors)}). {CLAP_AUDIO_HINT}")


def save_audioldm(model: AudioLDM, tokenizer, out_dir: str) -> str:
    """Write `model` in the hub folder layout (plus `audio_encoder/` when it holds a CLAP model).

    Returns:
        `out_dir`.
    """
    import diffusers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "text_encoder", "vocoder"):
        getattr(model, name).save_pretrained(str(out / name))
    model.scheduler.save_pretrained(str(out / "scheduler"))
    tokenizer.save_pretrained(str(out / "tokenizer"))
    clap = model.extras.get("clap_audio")
    if clap is not None:
        clap.model.save_pretrained(str(out / "audio_encoder"))
        clap.feature_extractor.save_pretrained(str(out / "feature_extractor"))
    index = {"_class_name": "AudioLDMPipeline", "_diffusers_version": diffusers.__version__}
    index.update({k: list(v) for k, v in COMPONENTS.items()})
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out_dir
