"""Music-theory metrics on synthesized notes and click tracks with known answers."""

import numpy as np
import pytest

from musiclora.eval.music import (
    best_key,
    detected_pitches,
    harmonic_accuracy,
    melodic_complexity,
    rhythmic_inconsistency,
)

SR = 22050
C_MAJOR_SCALE = [60, 62, 64, 65, 67, 69, 71, 72]
CHROMATIC = list(range(60, 72))


def _notes(midis, dur=0.25) -> np.ndarray:
    """Sine notes with 10 ms fades, one after the other."""
    t = np.arange(int(dur * SR)) / SR
    fade = np.minimum(1.0, np.minimum(t, dur - t) / 0.01)
    return np.concatenate(
        [0.3 * fade * np.sin(2 * np.pi * 440 * 2 ** ((m - 69) / 12) * t) for m in midis]
    ).astype(np.float32)


def _clicks(times, duration_s) -> np.ndarray:
    """Short decaying noise bursts starting at `times` (s)."""
    y = np.zeros(int(duration_s * SR), np.float32)
    n = int(0.01 * SR)
    burst = np.random.default_rng(0).standard_normal(n) * np.exp(-np.arange(n) / (0.002 * SR))
    for t in times:
        i = round(t * SR)
        y[i : i + n] += burst[: len(y[i : i + n])].astype(np.float32)
    return y


BEATS_120 = 0.5 + 0.5 * np.arange(16)  # 120 bpm, 16 beats


@pytest.fixture(scope="module")
def scale_pitches() -> np.ndarray:
    return detected_pitches(_notes(C_MAJOR_SCALE), SR)


@pytest.fixture(scope="module")
def chromatic_pitches() -> np.ndarray:
    return detected_pitches(_notes(CHROMATIC), SR)


def test_detected_pitches_follow_the_scale(scale_pitches):
    assert scale_pitches.dtype == np.float64
    notes = np.round(scale_pitches).astype(int)
    assert sorted(set(notes)) == C_MAJOR_SCALE
    assert np.all(np.diff(notes) >= 0)  # in time order, rising
    assert np.median(np.abs(scale_pitches - notes)) < 0.15  # in tune


def test_c_major_scale_is_fully_harmonic(scale_pitches):
    y = _notes(C_MAJOR_SCALE)
    assert harmonic_accuracy(y, SR, pitches=scale_pitches) == pytest.approx(100.0)
    assert best_key(scale_pitches) == ("C major", pytest.approx(100.0))


def test_chromatic_run_scores_lower(scale_pitches, chromatic_pitches):
    chromatic = harmonic_accuracy(None, SR, pitches=chromatic_pitches)
    assert chromatic < harmonic_accuracy(None, SR, pitches=scale_pitches) - 25
    assert chromatic == pytest.approx(100 * 7 / 12, abs=5)  # equal time on all 12 pitch classes


def test_harmonic_accuracy_from_waveform_runs_detection():
    assert harmonic_accuracy(_notes([57, 59, 60, 62, 64]), SR) == pytest.approx(100.0)


def test_best_key_prefers_major_on_tie_and_finds_minor():
    a_natural_minor = np.array([57, 59, 60, 62, 64, 65, 67])  # same set as C major
    assert best_key(a_natural_minor)[0] == "C major"
    c_minor = np.array([60, 62, 63, 65, 67, 68, 70, 60, 63, 67])
    assert best_key(c_minor) == ("C minor", pytest.approx(100.0))


def test_melodic_complexity_counts_distinct_notes(scale_pitches, chromatic_pitches):
    assert melodic_complexity(None, SR, pitches=scale_pitches) == len(set(C_MAJOR_SCALE))
    assert melodic_complexity(None, SR, pitches=chromatic_pitches) == len(CHROMATIC)
    arpeggio = [60, 64, 67, 72, 67, 64, 60]
    assert melodic_complexity(_notes(arpeggio), SR) == len(set(arpeggio))


def test_pitch_metrics_reject_silence_and_bad_input():
    with pytest.raises(ValueError, match="no pitched frames"):
        harmonic_accuracy(np.zeros(SR, np.float32), SR)
    with pytest.raises(ValueError, match="mono"):
        detected_pitches(np.zeros((3, SR)), SR)
    with pytest.raises(ValueError, match=r"looks like \[L, C\]"):
        detected_pitches(np.zeros((SR, 2)), SR)
    with pytest.raises(ValueError, match="sr"):
        detected_pitches(np.zeros(SR), 0)


def test_click_track_on_the_beat_is_consistent():
    y = _clicks(BEATS_120, 9.0)
    assert rhythmic_inconsistency(y, SR) < 2.5  # tempo estimated
    assert rhythmic_inconsistency(y, SR, bpm=120) < 2.5


def test_jitter_raises_inconsistency_monotonically():
    rng = np.random.default_rng(1)
    unit = rng.uniform(-1, 1, BEATS_120.size)
    values = [
        rhythmic_inconsistency(_clicks(BEATS_120 + j * unit, 9.0), SR, bpm=120) for j in (0, 0.03, 0.06)
    ]
    assert values[0] < values[1] < values[2]
    assert rhythmic_inconsistency(_clicks(BEATS_120 + 0.06 * unit, 9.0), SR) > values[0] + 3


def test_fixed_grid_offset_measures_a_known_lag():
    lag_eighth = _clicks(BEATS_120 + 0.125, 9.0)  # every click a quarter of a beat late
    assert rhythmic_inconsistency(lag_eighth, SR, bpm=120, offset_s=0.0) == pytest.approx(25.0, abs=3.0)
    on_off_beat = _clicks(BEATS_120 + 0.25, 9.0)  # half a beat: the worst case
    assert rhythmic_inconsistency(on_off_beat, SR, bpm=120, offset_s=0.0) == pytest.approx(50.0, abs=3.0)


def test_rhythmic_inconsistency_errors():
    with pytest.raises(ValueError, match="bpm"):
        rhythmic_inconsistency(_clicks(BEATS_120, 9.0), SR, bpm=0)
    with pytest.raises(ValueError, match="at least 2 onsets"):
        rhythmic_inconsistency(np.zeros(SR, np.float32), SR)


# --------------------------------------------------------------------------- stereo 44.1 kHz (Stable Audio Open's output)

SR_SAO = 44100


def _stereo_notes(midis, dur=0.25) -> np.ndarray:
    """Sine notes at 44.1 kHz, full in the left channel and at half level in the right: [2, L]."""
    t = np.arange(int(dur * SR_SAO)) / SR_SAO
    fade = np.minimum(1.0, np.minimum(t, dur - t) / 0.01)
    left = np.concatenate([0.3 * fade * np.sin(2 * np.pi * 440 * 2 ** ((m - 69) / 12) * t) for m in midis])
    return np.stack([left, 0.5 * left]).astype(np.float32)


def test_pitch_metrics_score_the_downmix_of_stereo_44k_audio():
    stereo = _stereo_notes(C_MAJOR_SCALE)
    pitches = detected_pitches(stereo, SR_SAO)
    assert sorted(set(np.round(pitches).astype(int))) == C_MAJOR_SCALE
    assert np.array_equal(pitches, detected_pitches(stereo.mean(axis=0), SR_SAO))  # the downmix is what is scored
    assert harmonic_accuracy(stereo, SR_SAO) == pytest.approx(100.0)
    assert melodic_complexity(stereo, SR_SAO) == len(C_MAJOR_SCALE)
    chromatic = _stereo_notes(CHROMATIC)
    assert harmonic_accuracy(chromatic, SR_SAO) < 75.0 and melodic_complexity(chromatic, SR_SAO) == len(CHROMATIC)


def test_rhythmic_inconsistency_on_stereo_44k_clicks():
    n = int(0.01 * SR_SAO)
    burst = np.random.default_rng(0).standard_normal(n) * np.exp(-np.arange(n) / (0.002 * SR_SAO))
    left = np.zeros(int(9.0 * SR_SAO), np.float32)
    for t in BEATS_120:
        i = round(t * SR_SAO)
        left[i : i + n] += burst.astype(np.float32)
    stereo = np.stack([left, 0.7 * left])
    assert rhythmic_inconsistency(stereo, SR_SAO, bpm=120) < 2.5
    late = np.stack([np.roll(left, round(0.125 * SR_SAO)), np.roll(0.7 * left, round(0.125 * SR_SAO))])
    assert rhythmic_inconsistency(late, SR_SAO, bpm=120, offset_s=0.0) == pytest.approx(25.0, abs=3.0)
