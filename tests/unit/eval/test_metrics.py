"""Distribution and per-clip metrics on constructed inputs with known answers."""

import itertools

import numpy as np
import pytest

from musiclora.eval.metrics import (
    KAD_SCALE,
    audio_feature_distance,
    chroma_cosine,
    clap_score,
    fad,
    kad,
    median_pairwise_distance,
    mel_mse,
)

SR = 22050


@pytest.fixture(scope="module")
def gauss() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((300, 8))


def _other_draw(seed: int = 1, n: int = 300, d: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d))


def _melody(notes, dur=0.3, harmonics=1) -> np.ndarray:
    t = np.arange(int(dur * SR)) / SR
    out = []
    for midi in notes:
        f = 440.0 * 2 ** ((midi - 69) / 12)
        out.append(sum(0.3 / h * np.sin(2 * np.pi * f * h * t) for h in range(1, harmonics + 1)))
    return np.concatenate(out).astype(np.float32)


# --- KAD ------------------------------------------------------------------------------------------


def test_kad_matches_pairwise_definition(gauss):
    x, y = gauss[:6], _other_draw(n=5)[:, :8] + 0.3
    sigma = 1.7
    k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * sigma**2))
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(a, b) for a in x for b in y) / (m * n)
    assert kad(x, y, bandwidth=sigma, scale=1.0) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kad_same_distribution_near_zero_and_identical_set_within_unbiased_bound(gauss):
    shifted = kad(gauss, _other_draw() + 0.5)
    same = kad(gauss, _other_draw())
    assert abs(same) < 0.05 * shifted
    # Identical sets: the unbiased estimate is 2 (k_mean - 1) / m, so |KAD| <= 2 * scale / m.
    assert abs(kad(gauss, gauss)) <= 2 * KAD_SCALE / len(gauss)


def test_kad_grows_with_mean_shift(gauss):
    fresh = _other_draw()
    values = [kad(gauss, fresh + s) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in itertools.pairwise(values))


def test_kad_default_bandwidth_is_reference_median_and_scale_is_linear(gauss):
    y = _other_draw() + 0.5
    sigma = median_pairwise_distance(gauss)
    assert kad(gauss, y) == pytest.approx(kad(gauss, y, bandwidth=sigma))
    assert kad(gauss, y) == pytest.approx(KAD_SCALE * kad(gauss, y, scale=1.0))


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (np.zeros((1, 4)), np.ones((3, 4)), "x has 1 rows"),
        (np.ones((3, 4)), np.zeros((1, 4)), "y has 1 rows"),
        (np.zeros((3, 4)), np.zeros((3, 5)), "dimension"),
        (np.zeros((0, 4)), np.zeros((3, 4)), "empty"),
        (np.zeros(4), np.zeros((3, 4)), "2-D"),
        (np.full((3, 2), np.nan), np.zeros((3, 2)), "NaN"),
    ],
)
def test_distribution_metrics_reject_bad_sets(x, y, match):
    for metric in (kad, fad):
        with pytest.raises(ValueError, match=match):
            metric(x, y)


def test_kad_rejects_zero_bandwidth():
    with pytest.raises(ValueError, match="bandwidth"):
        kad(np.ones((4, 3)), np.zeros((4, 3)))


# --- FAD ------------------------------------------------------------------------------------------


def test_fad_identical_sets_zero_and_pure_mean_shift_is_squared_norm(gauss):
    assert fad(gauss, gauss) == pytest.approx(0.0, abs=1e-8)
    shift = np.linspace(-1.0, 1.0, gauss.shape[1])
    assert fad(gauss, gauss + shift) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_fad_one_dimensional_closed_form():
    x = np.random.default_rng(3).standard_normal((500, 1))
    y = 2.0 * x + 1.0
    mx, my = x.mean(), y.mean()
    sx, sy = x.std(ddof=1), y.std(ddof=1)
    assert fad(x, y) == pytest.approx((mx - my) ** 2 + (sx - sy) ** 2, rel=1e-8)


def test_fad_grows_with_shift(gauss):
    fresh = _other_draw()
    values = [fad(gauss, fresh + s) for s in (0.0, 0.25, 0.5, 1.0)]
    assert all(a < b for a, b in itertools.pairwise(values))


def test_fad_singular_covariance_stays_finite():
    x = np.random.default_rng(4).standard_normal((5, 10))  # fewer clips than dimensions
    assert fad(x, x + 1.0) == pytest.approx(10.0, rel=1e-4)


# --- CLAP score -----------------------------------------------------------------------------------


def test_clap_score_identical_opposite_orthogonal_and_scale_invariant():
    v = np.random.default_rng(5).standard_normal((4, 16))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    assert clap_score(v, v) == pytest.approx(1.0)
    assert clap_score(v, -3.0 * v) == pytest.approx(-1.0)
    e = np.eye(4)
    assert clap_score(e, np.roll(e, 1, axis=1)) == pytest.approx(0.0)
    assert clap_score(2.0 * v, 5.0 * v) == pytest.approx(1.0)


def test_clap_score_errors():
    with pytest.raises(ValueError, match="shape"):
        clap_score(np.ones((2, 3)), np.ones((3, 3)))
    with pytest.raises(ValueError, match="audio_emb row 1 has zero norm"):
        clap_score(np.ones((2, 3)), np.array([[1.0, 0, 0], [0, 0, 0]]))


# --- per-clip distances ---------------------------------------------------------------------------


def test_mel_mse_zero_for_same_clip_and_6db_for_doubled_amplitude():
    noise = 0.1 * np.random.default_rng(6).standard_normal(SR).astype(np.float32)
    assert mel_mse(noise, noise, SR) == 0.0
    longer = np.concatenate([noise, np.ones(SR // 2, np.float32)])
    assert mel_mse(noise, longer, SR) == 0.0  # cropped to the shorter clip
    assert mel_mse(noise, 2 * noise, SR) == pytest.approx((10 * np.log10(4)) ** 2, rel=1e-4)


def test_mel_mse_names_bad_input():
    with pytest.raises(ValueError, match="b must be a mono waveform"):
        mel_mse(np.zeros(100), np.zeros((2, 100)), SR)
    with pytest.raises(ValueError, match="a is empty"):
        mel_mse(np.zeros(0), np.zeros(100), SR)


def test_audio_feature_distance_orders_similarity():
    t = np.arange(SR) / SR
    a440 = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    a466 = (0.3 * np.sin(2 * np.pi * 466 * t)).astype(np.float32)
    noise = 0.1 * np.random.default_rng(7).standard_normal(SR).astype(np.float32)
    assert audio_feature_distance(a440, a440, SR) == pytest.approx(0.0, abs=1e-12)
    near, far = audio_feature_distance(a440, a466, SR), audio_feature_distance(a440, noise, SR)
    assert 0 < near < far <= 2
    assert audio_feature_distance(noise, a440, SR) == pytest.approx(far)


def test_chroma_cosine_identical_timbre_and_transposition():
    tune = [60, 62, 64, 65, 67, 65, 64, 62]
    melody = _melody(tune)
    assert chroma_cosine(melody, melody, SR) == pytest.approx(1.0)
    same_notes_other_timbre = chroma_cosine(melody, _melody(tune, harmonics=3), SR)
    tritone_up = chroma_cosine(melody, _melody([n + 6 for n in tune]), SR)
    assert same_notes_other_timbre > 0.9
    assert tritone_up < 0.5


def test_chroma_cosine_all_silent_raises():
    with pytest.raises(ValueError, match="silent"):
        chroma_cosine(np.zeros(SR, np.float32), np.zeros(SR, np.float32), SR)
