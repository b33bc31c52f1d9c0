"""Score a set of generated clips: the metrics of issue 9, per clip and over the set.

Per clip (then averaged over the clips where defined):

- `clap_score`: cosine of the CLAP text embedding of the prompt and the CLAP audio embedding of
  its clip (seed study 000);
- `mel_mse`, `audio_feature_distance`: spectral distance and audio feature distance (seed study
  001) from the clip to every reference clip, averaged over the reference set;
- `harmonic_accuracy`, `melodic_complexity`, `rhythmic_inconsistency` (seed study 002), computed
  at 22.05 kHz from one pYIN pass per clip;
- `chroma_cosine`: melody input vs output (MusicGen-Melody), for prompts that carry a melody.

Over the set: `kad_<embedder>` and `fad_<embedder>` between the reference and the generated
embeddings, for every embedder; `kad` / `fad` are those of the first embedder.

A metric that is undefined for a clip (no pitched frame, fewer than 2 onsets) is left out of its
mean and counted; a metric undefined for every clip is NaN in the flat dict (null in JSON).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from musiclora.audio import resample, to_mono
from musiclora.eval.metrics import (
    audio_feature_distance,
    chroma_cosine,
    clap_score,
    fad,
    feature_distance,
    frame_features,
    kad,
    log_mel,
    mel_mse,
)
from musiclora.eval.music import (
    detected_pitches,
    harmonic_accuracy,
    melodic_complexity,
    rhythmic_inconsistency,
)

MUSIC_SAMPLE_RATE = 22050
"""Rate the music-theory metrics run at (pYIN frames of 2048 samples = 93 ms)."""

HIGHER_IS_BETTER = {
    "clap_score": True,
    "kad": False,
    "fad": False,
    "mel_mse": False,
    "audio_feature_distance": False,
    "harmonic_accuracy": True,
    "melodic_complexity": None,
    "rhythmic_inconsistency": False,
    "chroma_cosine": True,
}
"""Direction of each metric family (None: no better direction; seed study 002 reads melodic
complexity per genre). `kad_<x>` / `fad_<x>` follow `kad` / `fad`."""

PER_CLIP = (
    "clap_score",
    "mel_mse",
    "audio_feature_distance",
    "harmonic_accuracy",
    "melodic_complexity",
    "rhythmic_inconsistency",
    "chroma_cosine",
)


def direction(metric: str) -> bool | None:
    """True if higher is better for `metric`, False if lower is, None if neither."""
    return HIGHER_IS_BETTER.get(metric.split("_")[0] if metric.startswith(("kad_", "fad_")) else metric)


def metric_key(embedder_name: str) -> str:
    """Embedder spec -> metric suffix: "crepe-tiny" -> "crepe_tiny", "encodec:facebook/x" -> "encodec_facebook_x"."""
    return "".join(c if c.isalnum() else "_" for c in embedder_name).strip("_").lower()


def music_scores(wav: np.ndarray, sample_rate: int) -> tuple[dict[str, float], dict[str, str]]:
    """Harmonic accuracy (%), melodic complexity (count), rhythmic inconsistency (% of a beat) of one clip.

    Args:
        wav: float32 clip at `sample_rate` Hz, mono [L] or stereo [C, L] (C <= 2, e.g. Stable Audio
            Open's 44.1 kHz output; the metrics score the downmix, see `musiclora.eval.music`).
        sample_rate: Hz; the clip is resampled to `MUSIC_SAMPLE_RATE` first.

    Returns:
        (values, errors): the metrics that are defined, and for each undefined one the reason.
    """
    y = resample(wav, sample_rate, MUSIC_SAMPLE_RATE)
    values: dict[str, float] = {}
    errors: dict[str, str] = {}
    pitches = detected_pitches(y, MUSIC_SAMPLE_RATE)
    if pitches.size:
        values["harmonic_accuracy"] = harmonic_accuracy(y, MUSIC_SAMPLE_RATE, pitches=pitches)
        values["melodic_complexity"] = float(melodic_complexity(y, MUSIC_SAMPLE_RATE, pitches=pitches))
    else:
        errors["harmonic_accuracy"] = errors["melodic_complexity"] = "no pitched frame detected"
    try:
        values["rhythmic_inconsistency"] = rhythmic_inconsistency(y, MUSIC_SAMPLE_RATE)
    except ValueError as exc:
        errors["rhythmic_inconsistency"] = str(exc)
    return values, errors


class ReferenceDistances:
    """Mean mel MSE and audio feature distance from a clip to every reference clip, reference side cached.

    Gives exactly `metrics.mel_mse` and `metrics.audio_feature_distance` averaged over the
    reference clips, but computes each reference clip's log-mel and frame features once (the
    pairwise loop otherwise dominates an evaluation). Clips of another length than the
    reference clip fall back to the plain functions (which crop to the shorter clip).

    Args:
        references: reference clips, float32 [L_j], at `sample_rate`; at least one.
        sample_rate: Hz.

    Raises:
        ValueError: `references` is empty or holds an invalid clip.
    """

    N_MFCC = 20

    def __init__(self, references: list[np.ndarray], sample_rate: int):
        if not references:
            raise ValueError("ReferenceDistances: no reference clips")
        self.references = [np.asarray(r, np.float32) for r in references]
        self.sample_rate = sample_rate
        self._mel = [log_mel(r, sample_rate).astype(np.float64) for r in self.references]
        self._feat = [frame_features(r, sample_rate, self.N_MFCC) for r in self.references]

    def __call__(self, wav: np.ndarray) -> dict[str, float]:
        """{"mel_mse": mean dB², "audio_feature_distance": mean cosine distance in [0, 2]} for one clip, mono [L]
        or channels-first [C, L] (a stereo family's output: its downmix `to_mono` is compared)."""
        wav = to_mono(wav)
        mel = log_mel(wav, self.sample_rate).astype(np.float64)
        feat = frame_features(wav, self.sample_rate, self.N_MFCC)
        mse, afd = [], []
        for ref, ref_mel, ref_feat in zip(self.references, self._mel, self._feat):
            if ref.size != wav.size:
                mse.append(mel_mse(ref, wav, self.sample_rate))
                afd.append(audio_feature_distance(ref, wav, self.sample_rate, n_mfcc=self.N_MFCC))
                continue
            mse.append(float(np.mean((ref_mel - mel) ** 2)))
            afd.append(feature_distance(ref_feat, feat))
        return {"mel_mse": float(np.mean(mse)), "audio_feature_distance": float(np.mean(afd))}


def distribution_scores(
    reference: dict[str, np.ndarray], generated: dict[str, np.ndarray]
) -> dict[str, float]:
    """KAD and FAD for every embedder: `kad_<key>`, `fad_<key>`, and `kad` / `fad` of the first one.

    Args:
        reference: embedder key -> reference embeddings [M, D] (M >= 2).
        generated: embedder key -> generated embeddings [N, D] (N >= 2), same keys and order.

    Returns:
        Flat dict of floats (KAD ×100 as kadtk, FAD in squared embedding units).

    Raises:
        ValueError: keys differ, or as `kad` / `fad`.
    """
    if list(reference) != list(generated):
        raise ValueError(f"embedders differ: reference {list(reference)} vs generated {list(generated)}")
    out: dict[str, float] = {}
    for i, key in enumerate(reference):
        out[f"kad_{key}"] = kad(reference[key], generated[key])
        out[f"fad_{key}"] = fad(reference[key], generated[key])
        if i == 0:
            out["kad"], out["fad"] = out[f"kad_{key}"], out[f"fad_{key}"]
    return out


@dataclass
class SetScores:
    """Scores of one generated set.

    Attributes:
        metrics: flat name -> float (NaN where undefined for every clip); the Tune-facing dict.
        per_clip: one dict per clip: metric -> float or None (undefined for that clip).
        counts: per-clip metric -> number of clips where it is defined.
        errors: per-clip metric -> distinct reasons it was undefined.
    """

    metrics: dict[str, float]
    per_clip: list[dict[str, float | None]]
    counts: dict[str, int] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)


def per_clip_clap(text_emb: np.ndarray, audio_emb: np.ndarray) -> list[float]:
    """Cosine of each prompt's text embedding with its clip's audio embedding ([N, D] each) -> N floats."""
    return [clap_score(text_emb[i : i + 1], audio_emb[i : i + 1]) for i in range(text_emb.shape[0])]


def aggregate(per_clip: list[dict[str, float | None]], errors: list[dict[str, str]]) -> SetScores:
    """Average per-clip values where defined; NaN where a metric is defined for no clip.

    Args:
        per_clip: one dict per clip (metric -> value or None).
        errors: one dict per clip (metric -> reason it is undefined).
    """
    metrics: dict[str, float] = {}
    counts: dict[str, int] = {}
    reasons: dict[str, list[str]] = {}
    names = [m for m in PER_CLIP if any(m in row for row in per_clip)]
    for name in names:
        values = [row[name] for row in per_clip if row.get(name) is not None]
        counts[name] = len(values)
        metrics[name] = float(np.mean(values)) if values else math.nan
        found = sorted({e[name] for e in errors if name in e})
        if found:
            reasons[name] = found
    return SetScores(metrics=metrics, per_clip=per_clip, counts=counts, errors=reasons)


def chroma_or_none(melody: np.ndarray | None, melody_sr: int | None, wav: np.ndarray, sample_rate: int):
    """`chroma_cosine(melody, output)` at `sample_rate` (melody resampled), or None without a melody.

    `wav` is the output, mono [L] or channels-first [C, L] (its downmix is compared).

    Returns:
        (value or None, error message or None) — the error when both clips are silent throughout.
    """
    if melody is None:
        return None, None
    mel = resample(melody, melody_sr or sample_rate, sample_rate)
    try:
        return chroma_cosine(mel, to_mono(wav), sample_rate), None
    except ValueError as exc:
        return None, str(exc)
