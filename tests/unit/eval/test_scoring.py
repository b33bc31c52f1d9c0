"""Scoring a generated set: cached reference distances, KAD/FAD per embedder, averaging, music metrics."""

import math

import numpy as np
import pytest

from musiclora.eval import scoring
from musiclora.eval.metrics import audio_feature_distance, mel_mse

SR = 32000


def _tone(freq_hz: float, seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    noise = 0.01 * np.random.default_rng(seed).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * freq_hz * t) + noise).astype(np.float32)


def test_cached_reference_distances_equal_the_metric_functions():
    refs = [_tone(220, seed=1), _tone(330, seed=2), _tone(440, seconds=0.7, seed=3)]  # last: other length
    clip = _tone(275, seed=4)
    got = scoring.ReferenceDistances(refs, SR)(clip)
    want_mse = np.mean([mel_mse(r, clip, SR) for r in refs])
    want_afd = np.mean([audio_feature_distance(r, clip, SR) for r in refs])
    assert got["mel_mse"] == pytest.approx(want_mse, rel=1e-9)
    assert got["audio_feature_distance"] == pytest.approx(want_afd, rel=1e-9)
    same = scoring.ReferenceDistances([refs[0], refs[0]], SR)(refs[0])
    assert same["mel_mse"] == pytest.approx(0.0, abs=1e-9)
    assert same["audio_feature_distance"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="no reference clips"):
        scoring.ReferenceDistances([], SR)


def test_distribution_scores_per_embedder_and_first_is_default():
    rng = np.random.default_rng(0)
    ref = {"a": rng.standard_normal((20, 4)), "b": rng.standard_normal((20, 3))}
    near = {"a": rng.standard_normal((20, 4)), "b": rng.standard_normal((20, 3))}
    far = {"a": rng.standard_normal((20, 4)) + 3.0, "b": rng.standard_normal((20, 3)) + 3.0}
    s_near, s_far = scoring.distribution_scores(ref, near), scoring.distribution_scores(ref, far)
    assert set(s_near) == {"kad", "fad", "kad_a", "fad_a", "kad_b", "fad_b"}
    assert s_near["kad"] == s_near["kad_a"] and s_near["fad"] == s_near["fad_a"]
    for key in ("kad_a", "fad_a", "kad_b", "fad_b"):
        assert s_far[key] > s_near[key]
    with pytest.raises(ValueError, match="embedders differ"):
        scoring.distribution_scores(ref, {"b": near["b"], "a": near["a"]})


def test_aggregate_averages_defined_values_and_gives_nan_when_none_is():
    per_clip = [
        {"clap_score": 0.2, "harmonic_accuracy": 80.0, "rhythmic_inconsistency": None},
        {"clap_score": 0.4, "harmonic_accuracy": None, "rhythmic_inconsistency": None},
    ]
    errors = [
        {"rhythmic_inconsistency": "too few onsets"},
        {"harmonic_accuracy": "no pitch", "rhythmic_inconsistency": "too few onsets"},
    ]
    out = scoring.aggregate(per_clip, errors)
    assert out.metrics["clap_score"] == pytest.approx(0.3)
    assert out.metrics["harmonic_accuracy"] == 80.0 and out.counts["harmonic_accuracy"] == 1
    assert math.isnan(out.metrics["rhythmic_inconsistency"]) and out.counts["rhythmic_inconsistency"] == 0
    assert out.errors == {"harmonic_accuracy": ["no pitch"], "rhythmic_inconsistency": ["too few onsets"]}
    assert "chroma_cosine" not in out.metrics


def test_metric_names_and_directions():
    assert scoring.metric_key("crepe-tiny") == "crepe_tiny"
    assert scoring.metric_key("encodec:facebook/encodec_32khz") == "encodec_facebook_encodec_32khz"
    assert scoring.direction("kad_crepe_tiny") is False and scoring.direction("clap_score") is True
    assert scoring.direction("melodic_complexity") is None


def test_music_scores_at_the_family_rate_scale_and_noise():
    notes = [60, 62, 64, 65, 67, 69, 71, 72]  # C major, C4..C5
    seconds = 0.25
    t = np.arange(int(seconds * SR)) / SR
    scale = np.concatenate([0.4 * np.sin(2 * np.pi * 440 * 2 ** ((n - 69) / 12) * t) for n in notes]).astype(
        np.float32
    )
    values, errors = scoring.music_scores(scale, SR)
    assert values["harmonic_accuracy"] == pytest.approx(100.0)
    assert values["melodic_complexity"] == 8 and "harmonic_accuracy" not in errors
    silence_values, silence_errors = scoring.music_scores(np.zeros(SR, np.float32), SR)
    assert (
        "harmonic_accuracy" not in silence_values
        and "no pitched frame" in silence_errors["harmonic_accuracy"]
    )
    assert "rhythmic_inconsistency" in silence_errors


def test_chroma_or_none():
    melody = _tone(262)
    value, err = scoring.chroma_or_none(melody, SR, melody, SR)
    assert value == pytest.approx(1.0) and err is None
    assert scoring.chroma_or_none(None, None, melody, SR) == (None, None)
    value, err = scoring.chroma_or_none(np.zeros(SR, np.float32), SR, np.zeros(SR, np.float32), SR)
    assert value is None and "silent" in err
