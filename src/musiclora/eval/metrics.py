"""Distribution metrics over embedding sets and per-clip audio distances.

Distribution metrics compare a reference set of clip embeddings with an evaluated
set (KAD, FAD); per-clip metrics compare one waveform with another (spectral
distance, audio feature distance, chroma similarity) or a text embedding with an
audio embedding (CLAP score). All arithmetic is float64 numpy.
"""

from __future__ import annotations

import librosa
import numpy as np
from scipy import linalg
from scipy.spatial.distance import cdist, pdist

KAD_SCALE = 100.0
"""Factor kadtk multiplies MMD² by (`SCALE_FACTOR = 100` in kadtk/kad.py)."""


def _embeddings(name: str, x: np.ndarray, min_rows: int) -> np.ndarray:
    """Check an embedding set and return it as float64 [N, D]."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {arr.shape}")
    if arr.shape[0] < min_rows:
        raise ValueError(
            f"{name} has {arr.shape[0]} rows; the unbiased estimate needs at least {min_rows} embeddings"
        )
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _same_dim(x: np.ndarray, y: np.ndarray, x_name: str, y_name: str) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{x_name} has dimension {x.shape[1]} but {y_name} has {y.shape[1]}")


def median_pairwise_distance(x: np.ndarray) -> float:
    """Median Euclidean distance over all pairs of rows (the median heuristic).

    Source: kadtk `median_pairwise_distance` (all pairs via `torch.pdist` when not
    subsampled); used as the Gaussian kernel bandwidth by `kad`.

    Args:
        x: embeddings, shape [N, D], any real dtype; N >= 2.

    Returns:
        The median of the N(N-1)/2 pairwise L2 distances, in embedding units.

    Raises:
        ValueError: if `x` is not 2-D, has fewer than 2 rows or non-finite values.
    """
    arr = _embeddings("x", x, min_rows=2)
    return float(np.median(pdist(arr, metric="euclidean")))


def kad(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None, scale: float = KAD_SCALE) -> float:
    """Kernel Audio Distance: unbiased MMD² with a Gaussian kernel, times `scale`.

    Source: Chung et al. 2025, "KAD: No More FAD!" (arXiv:2502.15602), eq. for the
    unbiased MMD² estimator, and its reference code kadtk (`calc_kernel_audio_distance`):

        k(a, b) = exp(-||a - b||² / (2 σ²))
        KAD = scale * [ Σ_{i≠j} k(x_i, x_j) / (m(m-1)) + Σ_{i≠j} k(y_i, y_j) / (n(n-1))
                        - 2 Σ_{i,j} k(x_i, y_j) / (mn) ]

    kadtk conventions kept: σ defaults to the median pairwise distance of the
    reference set `x` (not of the pooled set); the result is multiplied by 100.
    Dropped: kadtk's eps=1e-8 in the denominator 2σ² (a zero bandwidth raises
    here instead) and its float32 arithmetic (float64 here). Pass
    `bandwidth=median_pairwise_distance(np.vstack([x, y]))` for a pooled bandwidth.
    Being unbiased, KAD can be slightly negative when the sets match.

    Args:
        x: reference embeddings (e.g. real music), shape [m, D]; m >= 2.
        y: evaluated embeddings (e.g. generated music), shape [n, D]; n >= 2.
        bandwidth: kernel width σ in embedding units; None uses the median heuristic on `x`.
        scale: factor applied to MMD²; 100 matches kadtk, 1 gives the raw MMD².

    Returns:
        KAD as a Python float (dimensionless; 0 when the distributions match).

    Raises:
        ValueError: on empty or non-2-D sets, fewer than 2 rows in either set,
            differing D, non-finite values, or a bandwidth that is not positive
            (e.g. every reference embedding is identical).
    """
    xs = _embeddings("x", x, min_rows=2)
    ys = _embeddings("y", y, min_rows=2)
    _same_dim(xs, ys, "x", "y")
    sigma = median_pairwise_distance(xs) if bandwidth is None else float(bandwidth)
    if not np.isfinite(sigma) or sigma <= 0:
        raise ValueError(
            f"KAD bandwidth must be positive and finite, got {sigma}"
            + (" (all reference embeddings x coincide; pass `bandwidth`)" if bandwidth is None else "")
        )
    gamma = 1.0 / (2.0 * sigma**2)
    m, n = xs.shape[0], ys.shape[0]
    k_xx = np.exp(-gamma * cdist(xs, xs, metric="sqeuclidean"))
    k_yy = np.exp(-gamma * cdist(ys, ys, metric="sqeuclidean"))
    k_xy = np.exp(-gamma * cdist(xs, ys, metric="sqeuclidean"))
    mean_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    mean_yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(scale * (mean_xx + mean_yy - 2.0 * k_xy.mean()))


def fad(x: np.ndarray, y: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two embedding sets.

    Source: Kilgour et al. 2019, "Fréchet Audio Distance" (Interspeech), after Heusel
    et al. 2017 (FID):

        FAD = ||μ_x - μ_y||² + tr(Σ_x + Σ_y - 2 (Σ_x Σ_y)^{1/2})

    Numerics follow the reference implementations (google-research
    frechet_audio_distance, fadtk, pytorch-fid): Σ by `np.cov` (ddof=1); if
    `sqrtm(Σ_x Σ_y)` is not finite, `eps·I` is added to both covariances and it is
    retried; an imaginary part is dropped when the diagonal's imaginary parts are
    within 1e-3 of zero, else it is an error. Rounding can leave a result of about
    -1e-10 for identical sets.

    Args:
        x: reference embeddings, shape [m, D]; m >= 2.
        y: evaluated embeddings, shape [n, D]; n >= 2.
        eps: diagonal offset used only when the first matrix square root fails.

    Returns:
        FAD as a Python float, in squared embedding units.

    Raises:
        ValueError: on empty or non-2-D sets, fewer than 2 rows, differing D,
            non-finite values, or a matrix square root with a large imaginary part.
    """
    xs = _embeddings("x", x, min_rows=2)
    ys = _embeddings("y", y, min_rows=2)
    _same_dim(xs, ys, "x", "y")
    mu_x, mu_y = xs.mean(axis=0), ys.mean(axis=0)
    sigma_x = np.atleast_2d(np.cov(xs, rowvar=False))
    sigma_y = np.atleast_2d(np.cov(ys, rowvar=False))
    covmean = linalg.sqrtm(sigma_x @ sigma_y)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma_x.shape[0]) * eps
        covmean = linalg.sqrtm((sigma_x + offset) @ (sigma_y + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            worst = float(np.max(np.abs(covmean.imag)))
            raise ValueError(f"FAD: sqrtm(Σ_x Σ_y) has an imaginary component of {worst:.3g}")
        covmean = covmean.real
    diff = mu_x - mu_y
    return float(diff @ diff + np.trace(sigma_x) + np.trace(sigma_y) - 2.0 * np.trace(covmean))


def clap_score(text_emb: np.ndarray, audio_emb: np.ndarray) -> float:
    """Mean cosine similarity between paired text and audio embeddings.

    Source: the CLAP score of seed study 000 (Kim et al. 2025, AudioLDM + LoRA) and
    of Stable Audio metrics: cosine similarity of the CLAP text embedding of the
    prompt and the CLAP audio embedding of the clip generated from it, averaged
    over pairs. Rows are L2-normalised here, so inputs need not be. This is the
    raw cosine in [-1, 1]; some code reports (cos + 1) / 2 instead.

    Args:
        text_emb: text embeddings, shape [N, D]; row i is the prompt of clip i.
        audio_emb: audio embeddings, shape [N, D].

    Returns:
        Mean cosine similarity as a Python float in [-1, 1].

    Raises:
        ValueError: if the arrays are empty, not 2-D, differ in shape, hold
            non-finite values or a row of zero norm.
    """
    t = _embeddings("text_emb", text_emb, min_rows=1)
    a = _embeddings("audio_emb", audio_emb, min_rows=1)
    if t.shape != a.shape:
        raise ValueError(f"text_emb shape {t.shape} differs from audio_emb shape {a.shape}")
    t_norm, a_norm = np.linalg.norm(t, axis=1), np.linalg.norm(a, axis=1)
    for name, norms in (("text_emb", t_norm), ("audio_emb", a_norm)):
        if (norms == 0).any():
            raise ValueError(f"{name} row {int(np.argmin(norms))} has zero norm")
    cos = np.sum(t * a, axis=1) / (t_norm * a_norm)
    return float(np.mean(cos))


def _waveform(name: str, y: np.ndarray) -> np.ndarray:
    """Check a mono waveform and return it as float32 [L] for librosa."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a mono waveform of shape [L], got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite samples")
    return arr


def _sample_rate(sr: int) -> int:
    if int(sr) != sr or sr <= 0:
        raise ValueError(f"sr must be a positive integer in Hz, got {sr}")
    return int(sr)


def log_mel(
    y: np.ndarray, sr: int, n_mels: int = 128, n_fft: int = 2048, hop_length: int = 512
) -> np.ndarray:
    """Log-mel power spectrogram in dB (absolute scale, ref 1.0, floor 1e-10).

    Args:
        y: mono waveform, shape [L], float in [-1, 1].
        sr: sample rate of `y` in Hz.
        n_mels: number of mel bands F.
        n_fft: FFT size in samples.
        hop_length: hop between frames in samples.

    Returns:
        float32 dB values, shape [F, T] with T = 1 + L // hop_length.

    Raises:
        ValueError: if `y` is not a non-empty finite 1-D array or `sr` is not positive.
    """
    wav = _waveform("y", y)
    power = librosa.feature.melspectrogram(
        y=wav, sr=_sample_rate(sr), n_fft=n_fft, hop_length=hop_length, n_mels=n_mels, power=2.0
    )
    return librosa.power_to_db(power, ref=1.0, amin=1e-10, top_db=None)


def mel_mse(a: np.ndarray, b: np.ndarray, sr: int, n_mels: int = 128, hop_length: int = 512) -> float:
    """Spectral distance: mean squared error between the log-mel spectrograms of two clips.

    Source: the "Spectral Distance: mean squared error of mel-spectrograms" of seed
    study 001 (LoRA for traditional music). Log-mel in dB (see `log_mel`) so the
    distance follows perceived level rather than raw power. Clips of different
    length are cropped to the shorter one (from the start) before the transform.

    Args:
        a: mono waveform, shape [L_a], float in [-1, 1] (e.g. the reference clip).
        b: mono waveform, shape [L_b], same sample rate as `a`.
        sr: sample rate of both clips in Hz.
        n_mels: number of mel bands.
        hop_length: hop between frames in samples.

    Returns:
        Mean squared dB difference over all bands and frames (dB²), a Python float.

    Raises:
        ValueError: if either clip is empty, not 1-D or non-finite, or `sr` is not positive.
    """
    wa, wb = _waveform("a", a), _waveform("b", b)
    length = min(wa.size, wb.size)
    ma = log_mel(wa[:length], sr, n_mels=n_mels, hop_length=hop_length).astype(np.float64)
    mb = log_mel(wb[:length], sr, n_mels=n_mels, hop_length=hop_length).astype(np.float64)
    return float(np.mean((ma - mb) ** 2))


def frame_features(y: np.ndarray, sr: int, n_mfcc: int = 20) -> np.ndarray:
    """The AFD feature set per frame, float64 [n_mfcc + 5, T]: MFCC, centroid, bandwidth, rolloff (Hz),
    ZCR, RMS (librosa defaults, hop 512), for a float mono clip [L] at `sr` Hz (not checked here)."""
    hop = 512
    rows = [
        librosa.feature.mfcc(y=y, sr=sr, n_mfcc=n_mfcc, hop_length=hop),
        librosa.feature.spectral_centroid(y=y, sr=sr, hop_length=hop),
        librosa.feature.spectral_bandwidth(y=y, sr=sr, hop_length=hop),
        librosa.feature.spectral_rolloff(y=y, sr=sr, hop_length=hop),
        librosa.feature.zero_crossing_rate(y, hop_length=hop),
        librosa.feature.rms(y=y, hop_length=hop),
    ]
    frames = min(r.shape[1] for r in rows)
    return np.concatenate([r[:, :frames] for r in rows], axis=0).astype(np.float64)


def audio_feature_distance(a: np.ndarray, b: np.ndarray, sr: int, n_mfcc: int = 20) -> float:
    """Audio Feature Distance: cosine distance between two clips' summary feature vectors.

    Source: the "Audio Feature Distance (AFD): cosine distance in multi-dimensional
    feature space" of seed study 001; its feature set is not published, so this one is
    ours: per clip, the time means of `n_mfcc` MFCCs, spectral centroid, spectral
    bandwidth, spectral rolloff (Hz), zero-crossing rate and RMS (librosa defaults,
    hop 512). Standardisation: each feature is divided by its frame-wise standard
    deviation over the frames of both clips pooled (1 where that is 0), so Hz-valued
    and MFCC features weigh alike. No centring: centring on a pool of two clips
    would point any two different clips in opposite directions.

    Args:
        a: mono waveform, shape [L_a], float in [-1, 1].
        b: mono waveform, shape [L_b], same sample rate; lengths may differ.
        sr: sample rate of both clips in Hz.
        n_mfcc: number of MFCCs.

    Returns:
        1 - cos(v_a, v_b) as a Python float in [0, 2]; 0 for identical clips.

    Raises:
        ValueError: if either clip is empty, not 1-D or non-finite, `sr` is not
            positive, or a standardised feature vector is all zeros.
    """
    rate = _sample_rate(sr)
    return feature_distance(frame_features(_waveform("a", a), rate, n_mfcc),
                            frame_features(_waveform("b", b), rate, n_mfcc))


def feature_distance(fa: np.ndarray, fb: np.ndarray) -> float:
    """`audio_feature_distance` on precomputed `frame_features` [F, T_a], [F, T_b] (lets a caller cache one side).

    Returns:
        1 - cos(v_a, v_b) in [0, 2] of the standardised time means (see `audio_feature_distance`).

    Raises:
        ValueError: a standardised feature vector is all zeros.
    """
    std = np.concatenate([fa, fb], axis=1).std(axis=1)
    std[std == 0] = 1.0
    va, vb = fa.mean(axis=1) / std, fb.mean(axis=1) / std
    na, nb = np.linalg.norm(va), np.linalg.norm(vb)
    if na == 0 or nb == 0:
        raise ValueError("audio_feature_distance: a feature vector is all zeros (silent clip?)")
    return float(1.0 - (va @ vb) / (na * nb))


def chroma_cosine(melody: np.ndarray, output: np.ndarray, sr: int, hop_length: int = 512) -> float:
    """Mean frame-wise cosine similarity of the chromagrams of a melody and an output.

    Measures how well a melody-conditioned generation (MusicGen-Melody) follows its
    melody. Chroma by `librosa.feature.chroma_stft` (12 bins, per-frame max-normalised,
    tuning estimated per clip). The chromagrams are cropped to the shorter one.
    Frames silent in both clips are skipped; a frame silent in only one clip scores 0.

    Args:
        melody: mono waveform of the conditioning melody, shape [L_m], float in [-1, 1].
        output: mono waveform of the generated clip, shape [L_o], same sample rate.
        sr: sample rate of both clips in Hz.
        hop_length: hop between chroma frames in samples.

    Returns:
        Mean cosine similarity over the kept frames, a Python float in [0, 1].

    Raises:
        ValueError: if either clip is empty, not 1-D or non-finite, `sr` is not
            positive, or every frame is silent in both clips.
    """
    rate = _sample_rate(sr)
    cm = librosa.feature.chroma_stft(y=_waveform("melody", melody), sr=rate, hop_length=hop_length)
    co = librosa.feature.chroma_stft(y=_waveform("output", output), sr=rate, hop_length=hop_length)
    frames = min(cm.shape[1], co.shape[1])
    cm, co = cm[:, :frames].astype(np.float64), co[:, :frames].astype(np.float64)
    nm, no = np.linalg.norm(cm, axis=0), np.linalg.norm(co, axis=0)
    keep = (nm > 0) | (no > 0)
    if not keep.any():
        raise ValueError("chroma_cosine: melody and output are silent in every frame")
    both = (nm > 0) & (no > 0)
    cos = np.zeros(frames)
    cos[both] = np.sum(cm[:, both] * co[:, both], axis=0) / (nm[both] * no[both])
    return float(cos[keep].mean())
