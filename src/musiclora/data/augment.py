"""Optional data augmentation for `prepare`: pitch shift, time stretch, added noise.

Each track can get `augment_copies` augmented copies beside the original. A copy's parameters
are drawn from a generator seeded by (config seed, track path, copy number), so re-running
`prepare` on the same input and config reproduces the same shards. Pitch shifts are whole
semitones, so a caption's key can be transposed with them (`analysis.retune_caption`).

- pitch shift: librosa.effects.pitch_shift (time stretch by 2^(-n/12), then resample; soxr_hq).
- time stretch: librosa.effects.time_stretch (phase vocoder); rate > 1 is faster.
- noise: white Gaussian noise at a signal-to-noise ratio in dB relative to the track's RMS level.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Augmentation:
    """One copy's parameters.

    Attributes:
        copy: 0 for the original, 1.. for augmented copies.
        semitones: pitch shift in semitones (0: none).
        rate: time-stretch rate (1.0: none; 1.1 plays 10 % faster).
        noise_snr_db: signal-to-noise ratio of the added noise in dB, or None for no noise.
    """

    copy: int = 0
    semitones: int = 0
    rate: float = 1.0
    noise_snr_db: float | None = None

    @property
    def is_identity(self) -> bool:
        return self.semitones == 0 and self.rate == 1.0 and self.noise_snr_db is None

    def describe(self) -> dict:
        """JSON-ready parameters for the sample's metadata."""
        return {"copy": self.copy, "semitones": self.semitones, "rate": self.rate, "noise_snr_db": self.noise_snr_db}


def _rng(seed: int, path: str, copy: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{path}:{copy}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def draw_augmentations(
    path: str,
    copies: int,
    seed: int = 0,
    pitch_shift_semitones: int = 0,
    time_stretch: float = 0.0,
    noise_snr_db: float | None = None,
) -> list[Augmentation]:
    """The original plus `copies` augmented copies of one track, drawn reproducibly.

    Args:
        path: the track's path or URL (part of the seed).
        copies: augmented copies wanted (0: only the original).
        seed: the config's seed.
        pitch_shift_semitones: largest |shift|; each copy draws a non-zero whole number in
            [-n, n] (0 disables pitch shifting).
        time_stretch: largest relative tempo change; each copy draws a rate in [1 - x, 1 + x],
            rounded to 0.001 (0 disables stretching).
        noise_snr_db: lowest SNR in dB; each copy draws one in [x, x + 10] (None: no noise).

    Returns:
        [identity, copy 1, ..., copy `copies`].

    Raises:
        ValueError: copies requested with every augmentation disabled, or values out of range.
    """
    if copies < 0 or pitch_shift_semitones < 0 or not 0 <= time_stretch < 0.5:
        raise ValueError(
            f"augmentation: copies {copies} and pitch_shift_semitones {pitch_shift_semitones} must be >= 0 "
            f"and time_stretch {time_stretch} in [0, 0.5)"
        )
    if copies and not (pitch_shift_semitones or time_stretch or noise_snr_db is not None):
        raise ValueError(
            f"augmentation: augment_copies={copies} but pitch_shift_semitones, time_stretch and noise_snr_db "
            "are all off; enable at least one"
        )
    out = [Augmentation()]
    for copy in range(1, copies + 1):
        rng = _rng(seed, path, copy)
        semitones = 0
        if pitch_shift_semitones:
            choices = [s for s in range(-pitch_shift_semitones, pitch_shift_semitones + 1) if s]
            semitones = int(rng.choice(choices))
        rate = round(float(rng.uniform(1 - time_stretch, 1 + time_stretch)), 3) if time_stretch else 1.0
        snr = round(float(rng.uniform(noise_snr_db, noise_snr_db + 10)), 2) if noise_snr_db is not None else None
        out.append(Augmentation(copy, semitones, rate, snr))
    return out


def apply_augmentation(y: np.ndarray, sr: int, aug: Augmentation, seed: int = 0, path: str = "") -> np.ndarray:
    """Apply one copy's augmentation to a waveform (the same change to every channel).

    Args:
        y: float32 waveform, mono [L] or [C, L], at `sr` Hz.
        sr: sample rate in Hz.
        aug: the parameters (identity returns a copy of `y`).
        seed / path: seed the noise (with `aug.copy`), as `draw_augmentations` does.

    Returns:
        float32 waveform, shape [L'] or [C, L'] with L' ~= L / rate; peaks above full scale are
        scaled down to 0.99 rather than clipped. Noise is drawn per channel (independent).

    Raises:
        ValueError: `y` is not 1-D or 2-D.
    """
    import librosa

    y = np.asarray(y, dtype=np.float32)
    if y.ndim not in (1, 2):
        raise ValueError(f"apply_augmentation expects audio of shape [L] or [C, L], got shape {y.shape}")
    out = y.copy()
    if aug.semitones:
        out = librosa.effects.pitch_shift(out, sr=sr, n_steps=aug.semitones, res_type="soxr_hq")
    if aug.rate != 1.0:
        out = librosa.effects.time_stretch(out, rate=aug.rate)
    if aug.noise_snr_db is not None:
        rms = float(np.sqrt(np.mean(out.astype(np.float64) ** 2))) if out.size else 0.0
        noise = _rng(seed, path, -aug.copy).standard_normal(out.shape)  # [L]: the mono draw as before
        out = out + (rms / 10 ** (aug.noise_snr_db / 20) * noise).astype(np.float32)
    peak = float(np.max(np.abs(out))) if out.size else 0.0
    if peak > 1.0:
        out = out * np.float32(0.99 / peak)
    return out.astype(np.float32, copy=False)
