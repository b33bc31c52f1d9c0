"""The melody chroma must be what transformers' MusicgenMelodyFeatureExtractor computes.

The extractor needs torchaudio, which cannot be installed beside torch 2.13 here, so the main
reference is an independent numpy re-implementation of its published steps
(transformers/models/musicgen_melody/feature_extraction_musicgen_melody.py):
torchaudio `Spectrogram(n_fft=16384, hop_length=4096, power=2, center=True, pad_mode="reflect",
normalized=True)` (torchaudio/functional/functional.py `spectrogram`) and librosa's chroma filter
bank as copied into `transformers.audio_utils.chroma_filter_bank` (librosa/filters.py `chroma`).
Where torchaudio does import, the real extractor is compared too.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
import torch
from transformers.audio_utils import chroma_filter_bank

from musiclora.models.chroma import HOP_LENGTH, N_FFT, SAMPLE_RATE, melody_chroma, raw_chroma

SR = SAMPLE_RATE


# --------------------------------------------------------------------------- the reference


def ref_filter_bank(sr: int = SR, n_fft: int = N_FFT, n_chroma: int = 12, ctroct: float = 5.0, octwidth: float = 2.0):
    """librosa.filters.chroma(sr, n_fft, tuning=0, base_c=True, norm=2), written out in float64."""
    frequencies = np.linspace(0, sr, n_fft, endpoint=False)[1:]
    octs = np.log2(frequencies / (440.0 / 16))  # hz_to_octs with tuning 0
    frqbins = n_chroma * octs
    frqbins = np.concatenate(([frqbins[0] - 1.5 * n_chroma], frqbins))
    binwidth = np.concatenate((np.maximum(frqbins[1:] - frqbins[:-1], 1.0), [1]))
    d = np.subtract.outer(frqbins, np.arange(n_chroma, dtype=np.float64)).T
    half = np.round(n_chroma / 2)
    d = np.remainder(d + half + 10 * n_chroma, n_chroma) - half
    wts = np.exp(-0.5 * (2 * d / binwidth[None, :]) ** 2)
    wts = wts / np.linalg.norm(wts, ord=2, axis=0, keepdims=True)
    wts *= np.exp(-0.5 * ((frqbins / n_chroma - ctroct) / octwidth) ** 2)[None, :]
    wts = np.roll(wts, -3, axis=0)  # start at C
    return wts[:, : n_fft // 2 + 1]


def ref_power_spectrogram(x: np.ndarray, n_fft: int = N_FFT, hop: int = HOP_LENGTH) -> np.ndarray:
    """torchaudio spectrogram(center, reflect, periodic Hann, normalized, power 2): float64 [F, T]."""
    window = scipy.signal.get_window("hann", n_fft, fftbins=True)
    padded = np.pad(x.astype(np.float64), n_fft // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    spec = np.fft.rfft(frames * window, axis=-1) / np.sqrt(np.sum(window**2))
    return (np.abs(spec) ** 2).T


def ref_extractor(x: np.ndarray, sr: int = SR, chunk_s: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
    """(raw [12, T], one-hot [T, 12]) as the feature extractor computes them for one mono input."""
    x = x[: int(chunk_s * sr)]
    if len(x) < N_FFT:
        pad = N_FFT - len(x)
        x = np.pad(x, (pad // 2, pad // 2 + pad % 2))
    raw = ref_filter_bank(sr) @ ref_power_spectrogram(x)
    norm = raw / np.maximum(raw.max(axis=0, keepdims=True), 1e-6)
    one_hot = np.zeros_like(norm.T)
    one_hot[np.arange(norm.shape[1]), norm.argmax(axis=0)] = 1.0
    return raw, one_hot


def tone(freq_hz: float, seconds: float, sr: int = SR, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def midi_hz(note: int) -> float:
    return 440.0 * 2 ** ((note - 69) / 12)


# --------------------------------------------------------------------------- the filter bank


def test_filter_bank_matches_librosa_formula_and_librosa():
    import librosa

    ours = chroma_filter_bank(num_frequency_bins=N_FFT, sampling_rate=SR, tuning=0, num_chroma=12)
    assert ours.shape == (12, N_FFT // 2 + 1)
    np.testing.assert_allclose(ours, ref_filter_bank(), rtol=1e-6, atol=1e-9)
    lib = librosa.filters.chroma(sr=SR, n_fft=N_FFT, tuning=0.0, n_chroma=12, base_c=True)
    np.testing.assert_allclose(ours, lib, rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------- the whole extractor


@pytest.fixture(scope="module")
def music_like() -> np.ndarray:
    """5 s of a melody over a drone with harmonics and a little noise (deterministic)."""
    rng = np.random.default_rng(0)
    melody = [60, 62, 64, 65, 67, 69, 71, 72, 71, 69]
    per = int(0.5 * SR)
    x = np.concatenate([sum(tone(midi_hz(n) * h, 0.5, amp=0.4 / h) for h in (1, 2, 3)) for n in melody])
    x = x + tone(midi_hz(48), len(x) / SR, amp=0.1)[: len(x)]
    assert len(x) == len(melody) * per
    return (x + 0.01 * rng.standard_normal(len(x))).astype(np.float32)


def test_raw_chroma_matches_the_reference(music_like):
    ref_raw, _ = ref_extractor(music_like)
    ours = raw_chroma(music_like).double().numpy()
    assert ours.shape == ref_raw.shape == (12, len(music_like) // HOP_LENGTH + 1)
    np.testing.assert_allclose(ours, ref_raw, rtol=2e-3, atol=1e-6 * ref_raw.max())


def test_one_hot_chroma_equals_the_reference_where_the_maximum_is_clear(music_like):
    ref_raw, ref_hot = ref_extractor(music_like)
    ours = melody_chroma(music_like).numpy()
    assert ours.shape == ref_hot.shape and ours.dtype == np.float32
    assert np.all(ours.sum(axis=1) == 1.0)
    top2 = np.sort(ref_raw, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-3 * top2[1]  # frames whose argmax float rounding cannot flip
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(ours[clear], ref_hot[clear])


def test_batch_and_single_inputs_agree(music_like):
    batch = np.stack([music_like, music_like[::-1].copy()])
    out = melody_chroma(torch.from_numpy(batch))
    assert out.shape == (2, len(music_like) // HOP_LENGTH + 1, 12)
    np.testing.assert_array_equal(out[0].numpy(), melody_chroma(music_like).numpy())
    np.testing.assert_array_equal(out[1].numpy(), ref_extractor(batch[1])[1])


# --------------------------------------------------------------------------- pitched tones


@pytest.mark.parametrize(
    ("note", "pitch_class"), [(60, 0), (61, 1), (64, 4), (67, 7), (69, 9), (70, 10), (71, 11), (57, 9), (72, 0)]
)
def test_pure_tones_land_in_their_pitch_class(note, pitch_class):
    out = melody_chroma(tone(midi_hz(note), 2.0))
    # frames fully inside the tone (the first and last see the reflect padding)
    assert out[1:-1].argmax(dim=1).unique().tolist() == [pitch_class]


def test_a_scale_is_followed_frame_by_frame():
    notes = [60, 62, 64, 65, 67, 69, 71]
    x = np.concatenate([tone(midi_hz(n), 1.0) for n in notes])
    classes = melody_chroma(x).argmax(dim=1).numpy()
    fps = SR / HOP_LENGTH
    for i, n in enumerate(notes):  # the middle frame of each one-second note
        assert classes[int((i + 0.5) * fps)] == n % 12


# --------------------------------------------------------------------------- lengths


def test_short_input_is_padded_symmetrically_like_the_extractor():
    x = tone(midi_hz(64), 0.2)  # 6400 samples < n_fft
    ref_raw, ref_hot = ref_extractor(x)
    assert melody_chroma(x).shape == (N_FFT // HOP_LENGTH + 1, 12)
    np.testing.assert_allclose(raw_chroma(x).double().numpy(), ref_raw, rtol=2e-3, atol=1e-6 * ref_raw.max())
    np.testing.assert_array_equal(melody_chroma(x).numpy()[1:-1], ref_hot[1:-1])


def test_long_input_is_truncated_to_the_30_s_chunk():
    x = np.tile(tone(midi_hz(69), 1.0), 31)
    assert melody_chroma(x).shape == (235, 12)  # MusicGen-Melody's chroma_length
    assert melody_chroma(x, max_length_s=None).shape == (len(x) // HOP_LENGTH + 1, 12)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="melody_chroma"):
        melody_chroma(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="melody_chroma"):
        melody_chroma(np.zeros((1, 2, 100), np.float32))


def test_equals_the_real_feature_extractor_where_torchaudio_imports(music_like):
    pytest.importorskip("torchaudio")
    from transformers import MusicgenMelodyFeatureExtractor

    extractor = MusicgenMelodyFeatureExtractor()
    expected = extractor(music_like, sampling_rate=SR, return_tensors="pt")["input_features"][0]
    np.testing.assert_array_equal(melody_chroma(music_like).numpy(), expected.numpy())
