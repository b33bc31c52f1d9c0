"""MusicGen-Melody's melody chroma, computed with torch alone (no torchaudio).

transformers' `MusicgenMelodyFeatureExtractor` builds its chroma from a torchaudio
`Spectrogram(n_fft=16384, hop_length=4096, power=2, center=True, normalized=True)` and librosa's
chroma filter bank (`transformers.audio_utils.chroma_filter_bank`), then keeps only the
strongest pitch class per frame (one-hot). torchaudio cannot be installed beside torch 2.13, so
this module reproduces the same steps with `torch.stft`:

    x     = x[:30 s]; zero-padded symmetrically to n_fft when shorter  (the extractor's pad/truncate)
    spec  = |STFT(x, hann(n_fft), hop, center, reflect)|² / Σ hann²      (torchaudio normalized=True)
    raw   = filters @ spec                                              [12, T_c]
    chroma= one_hot(argmax_c raw / max_c raw)                           [T_c, 12]

`raw_chroma` returns the step before the argmax so tests can compare numbers, not only one-hots.

Source: transformers/models/musicgen_melody/feature_extraction_musicgen_melody.py
(`_torch_extract_fbank_features`), torchaudio.functional.spectrogram.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from transformers.audio_utils import chroma_filter_bank

SAMPLE_RATE = 32_000
N_FFT = 16_384
HOP_LENGTH = 4_096
NUM_CHROMA = 12


@functools.lru_cache(maxsize=4)
def chroma_filters(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, num_chroma: int = NUM_CHROMA) -> torch.Tensor:
    """The extractor's chroma filter bank, float32 [num_chroma, n_fft // 2 + 1] (librosa's, tuning 0)."""
    bank = chroma_filter_bank(sampling_rate=sample_rate, num_frequency_bins=n_fft, tuning=0, num_chroma=num_chroma)
    return torch.from_numpy(np.asarray(bank)).float()


def power_spectrogram(wav: torch.Tensor, n_fft: int = N_FFT, hop_length: int = HOP_LENGTH) -> torch.Tensor:
    """torchaudio-equivalent `Spectrogram(power=2, center=True, normalized=True)`.

    Args:
        wav: float32 waveforms, shape [B, L].

    Returns:
        float32 power spectrogram, shape [B, n_fft // 2 + 1, T_c], T_c = L // hop_length + 1.
    """
    window = torch.hann_window(n_fft, dtype=wav.dtype, device=wav.device)
    stft = torch.stft(
        wav, n_fft, hop_length=hop_length, win_length=n_fft, window=window,
        center=True, pad_mode="reflect", normalized=False, onesided=True, return_complex=True,
    )
    stft = stft / window.pow(2.0).sum().sqrt()
    return stft.abs().pow(2.0)


def _prepare_input(wav: torch.Tensor | np.ndarray, sample_rate: int, max_length_s: float | None) -> tuple[torch.Tensor, bool]:
    x = torch.as_tensor(wav, dtype=torch.float32)
    squeeze = x.dim() == 1
    if squeeze:
        x = x[None]
    if x.dim() != 2 or x.shape[-1] == 0:
        raise ValueError(f"melody_chroma: expected a waveform [B, L] or [L] with L > 0, got shape {tuple(x.shape)}")
    if max_length_s is not None:  # the extractor truncates to chunk_length (30 s) of samples
        x = x[:, : round(max_length_s * sample_rate)]
    if x.shape[-1] < N_FFT:  # the extractor pads short inputs symmetrically to n_fft
        pad = N_FFT - x.shape[-1]
        x = torch.nn.functional.pad(x, (pad // 2, pad // 2 + pad % 2))
    return x, squeeze


def raw_chroma(
    wav: torch.Tensor | np.ndarray, sample_rate: int = SAMPLE_RATE, max_length_s: float | None = 30.0
) -> torch.Tensor:
    """Chroma energies before the one-hot step: filter bank times the normalised power spectrogram.

    Args:
        wav: float mono waveforms at `sample_rate` Hz, shape [B, L] or [L].
        sample_rate: the model's rate in Hz (32 kHz for facebook/musicgen-melody).
        max_length_s: keep only the first seconds, as the extractor's `chunk_length` (30 s) does;
            None keeps everything.

    Returns:
        float32 energies, shape [B, 12, T_c] ([12, T_c] for a 1-D input), T_c = L' // 4096 + 1
        for the (truncated or padded) length L'; bin 0 is C.

    Raises:
        ValueError: empty input or more than 2 dimensions.
    """
    x, squeeze = _prepare_input(wav, sample_rate, max_length_s)
    raw = torch.einsum("cf,bft->bct", chroma_filters(sample_rate), power_spectrogram(x))
    return raw[0] if squeeze else raw


def melody_chroma(
    wav: torch.Tensor | np.ndarray, sample_rate: int = SAMPLE_RATE, max_length_s: float | None = 30.0
) -> torch.Tensor:
    """One-hot melody chroma exactly as MusicGen-Melody's feature extractor computes it.

    Args:
        wav: float mono waveforms at `sample_rate` Hz, shape [B, L] or [L].
        sample_rate: must be the model's rate (32 kHz for facebook/musicgen-melody); resample first.
        max_length_s: see `raw_chroma` (the extractor's 30 s `chunk_length`).

    Returns:
        float32 one-hot chroma, shape [B, T_c, 12] ([T_c, 12] for a 1-D input), at
        sample_rate / 4096 frames per second (7.8125 Hz at 32 kHz); bin 0 is C.

    Raises:
        ValueError: empty input or more than 2 dimensions.
    """
    raw = raw_chroma(wav, sample_rate, max_length_s)
    squeeze = raw.dim() == 2
    if squeeze:
        raw = raw[None]
    norm = torch.nn.functional.normalize(raw, p=float("inf"), dim=-2, eps=1e-6).transpose(1, 2)
    one_hot = torch.zeros_like(norm).scatter_(-1, norm.argmax(-1, keepdim=True), 1.0)
    return one_hot[0] if squeeze else one_hot


def zero_padded_chroma(chroma: torch.Tensor, valid_samples: torch.Tensor, hop_length: int = HOP_LENGTH) -> torch.Tensor:
    """Zero the chroma frames of zero-padding, so the padded tail of a short segment is not read as C.

    The extractor's argmax turns a silent frame into a one-hot C (bin 0); for the padded tail of a
    segment that would teach "C" where there is no music. A frame t is centred on sample t * hop
    (center=True); it counts as padding when that sample lies at or past the valid audio.

    Args:
        chroma: float chroma, shape [B, T_c, 12].
        valid_samples: int number of real samples per item, shape [B].
        hop_length: the chroma hop in samples (4096 at 32 kHz).

    Returns:
        chroma with the padding frames set to 0, same shape and dtype (a new tensor).

    Raises:
        ValueError: `chroma` is not [B, T_c, 12] or `valid_samples` is not [B].
    """
    if chroma.dim() != 3 or chroma.shape[-1] != NUM_CHROMA or valid_samples.shape != (chroma.shape[0],):
        raise ValueError(f"expected chroma [B, T_c, 12] and valid_samples [B]; got {tuple(chroma.shape)} and "
                         f"{tuple(valid_samples.shape)}")
    centres = torch.arange(chroma.shape[1], device=chroma.device) * hop_length
    keep = centres[None, :] < valid_samples.to(chroma.device)[:, None]
    return chroma * keep[:, :, None].to(chroma.dtype)


def null_chroma(num_frames: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The null melody condition of classifier-free guidance: every frame one-hot C, shape [num_frames, 12].

    Source: transformers `MusicgenMelodyForConditionalGeneration._prepare_encoder_hidden_states_kwargs_for_generation`
    (`null_audio_hidden_states[:, :, 0] = 1`).
    """
    out = torch.zeros(num_frames, NUM_CHROMA, dtype=dtype, device=device)
    out[:, 0] = 1
    return out
