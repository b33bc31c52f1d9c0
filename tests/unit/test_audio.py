"""Audio decoding and preprocessing primitives, on synthesized signals."""

from __future__ import annotations

import io
import math
import pickle

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf

from musiclora.audio import (
    AudioDecodeError,
    is_silent,
    load_audio,
    load_clip,
    normalize_loudness,
    normalize_peak,
    preprocess,
    resample,
    rms_db,
    save_audio,
    segment,
    to_channels,
    to_mono,
    trim_silence,
)


def sine(freq_hz: float, seconds: float, sr: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def peak_frequency(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spectrum)])


def integrated_lufs(x: np.ndarray, sr: int) -> float:
    return pyloudnorm.Meter(sr).integrated_loudness(np.asarray(x, dtype=np.float64).T)


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    ("fmt", "subtype", "suffix", "lossless"),
    [
        ("WAV", "PCM_16", ".wav", True),
        ("WAV", "FLOAT", ".wav", True),
        ("FLAC", "PCM_24", ".flac", True),
        ("OGG", "VORBIS", ".ogg", False),
        ("OGG", "OPUS", ".opus", False),
    ],
)
def test_load_audio_round_trips_formats(tmp_path, fmt, subtype, suffix, lossless):
    sr = 48000
    stereo = np.stack([sine(440, 1.0, sr), sine(660, 1.0, sr, amp=0.25)])  # [C, L]
    path = tmp_path / f"tone{suffix}"
    sf.write(path, stereo.T, sr, format=fmt, subtype=subtype)

    audio, got_sr = load_audio(path)

    assert got_sr == sr
    assert audio.dtype == np.float32
    assert audio.shape[0] == 2
    assert abs(audio.shape[1] - stereo.shape[1]) <= (0 if lossless else 2048)
    if lossless:
        np.testing.assert_allclose(audio, stereo, atol=1e-4)
    # channel order survives: the left channel is the 440 Hz tone, the right the 660 Hz one
    assert abs(peak_frequency(audio[0], sr) - 440) < 5
    assert abs(peak_frequency(audio[1], sr) - 660) < 5


def test_load_audio_mp3_when_libsndfile_supports_it(tmp_path):
    if "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile has no MP3 support")
    sr = 44100
    path = tmp_path / "tone.mp3"
    sf.write(path, sine(1000, 1.0, sr), sr, format="MP3")
    audio, got_sr = load_audio(path)
    assert got_sr == sr and audio.shape[0] == 1
    assert abs(peak_frequency(audio[0], sr) - 1000) < 5


def test_load_audio_reads_file_objects(tmp_path):
    sr = 16000
    buf = io.BytesIO()
    sf.write(buf, sine(500, 0.5, sr), sr, format="FLAC")
    buf.seek(0)
    audio, got_sr = load_audio(buf, name="memory.flac")
    assert got_sr == sr and audio.shape == (1, 8000)


def _wav_bytes(x: np.ndarray, sr: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _flac_bytes(x: np.ndarray, sr: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="FLAC")
    return buf.getvalue()


def _ogg_bytes(x: np.ndarray, sr: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="OGG", subtype="VORBIS")
    return buf.getvalue()


TONE = sine(440, 1.0, 16000)
BAD_INPUTS = {
    "empty.wav": b"",
    "text.wav": b"this is a text file, not audio\n" * 20,
    "random.flac": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "zero_length.wav": _wav_bytes(np.zeros(0, dtype=np.float32), 16000),
    "truncated.wav": _wav_bytes(TONE, 16000)[: len(_wav_bytes(TONE, 16000)) // 2],
    "truncated.flac": _flac_bytes(TONE, 16000)[: len(_flac_bytes(TONE, 16000)) // 2],
    "truncated.ogg": _ogg_bytes(TONE, 16000)[: len(_ogg_bytes(TONE, 16000)) // 2],
    "header_only.ogg": _ogg_bytes(TONE, 16000)[:30],
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_load_audio_rejects_bad_files_naming_them(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(BAD_INPUTS[name])
    with pytest.raises(AudioDecodeError) as info:
        load_audio(path)
    assert name in str(info.value)
    assert info.value.path == str(path)
    assert info.value.reason


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_load_audio_rejects_bad_file_objects_naming_them(name):
    with pytest.raises(AudioDecodeError, match=name.replace(".", r"\.")):
        load_audio(io.BytesIO(BAD_INPUTS[name]), name=f"s3://bucket/{name}")


def test_load_audio_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        load_audio(tmp_path / "nope.wav")
    with pytest.raises(AudioDecodeError, match="directory"):
        load_audio(tmp_path)


def test_audio_decode_error_survives_pickling():
    err = pickle.loads(pickle.dumps(AudioDecodeError("a/b.ogg", "truncated")))
    assert (err.path, err.reason) == ("a/b.ogg", "truncated")
    assert isinstance(err, ValueError) and "a/b.ogg" in str(err)


@pytest.mark.parametrize("audio_format", ["WAV", "flac"])
def test_save_audio_keeps_the_channels_and_load_clip_gives_them_back(tmp_path, audio_format):
    """[C, L] is written as a C-channel file (not L channels of C frames); mono stays mono; both round-trip."""
    sr = 44100
    stereo = np.stack([sine(440, 0.25, sr), sine(660, 0.25, sr, amp=0.2)])
    buf = io.BytesIO()
    save_audio(buf, stereo, sr, audio_format)
    info = sf.info(io.BytesIO(buf.getvalue()))
    assert info.channels == 2 and info.frames == stereo.shape[1] and info.samplerate == sr
    assert info.format == audio_format.upper() and info.subtype == "PCM_16"
    back, rate = load_clip(io.BytesIO(buf.getvalue()))
    assert rate == sr and back.shape == stereo.shape
    np.testing.assert_allclose(back, stereo, atol=1 / 32768)
    path = tmp_path / "sub" / "mono.wav"
    save_audio(path, 3 * stereo[0], sr)  # clipped to [-1, 1], the folder made
    mono, _ = load_clip(path)
    assert mono.shape == (stereo.shape[1],) and sf.info(path).channels == 1 and mono.max() <= 1.0 < 3 * stereo[0].max()


@pytest.mark.parametrize(("shape", "match"), [((4410, 2), r"looks like \[L, C\]"), ((3, 100), "C = 1 or 2"),
                                              ((2, 0), "L > 0"), ((1, 2, 3), "C = 1 or 2")])
def test_save_audio_refuses_other_layouts(shape, match):
    with pytest.raises(ValueError, match=match):
        save_audio(io.BytesIO(), np.zeros(shape, np.float32), 16000)
    with pytest.raises(ValueError, match="WAV or FLAC"):
        save_audio(io.BytesIO(), np.zeros(10, np.float32), 16000, "MP3")


# --------------------------------------------------------------------------- primitives


def test_to_mono_averages_channels():
    left, right = sine(440, 0.1, 8000), sine(550, 0.1, 8000, amp=0.2)
    mono = to_mono(np.stack([left, right]))
    assert mono.shape == left.shape and mono.dtype == np.float32
    np.testing.assert_allclose(mono, (left + right) / 2, atol=1e-7)
    np.testing.assert_array_equal(to_mono(left), left)
    with pytest.raises(ValueError, match="shape"):
        to_mono(np.zeros((1, 2, 3)))


@pytest.mark.parametrize(("orig_sr", "target_sr"), [(44100, 32000), (48000, 16000), (22050, 44100)])
def test_resample_keeps_frequency_and_scales_length(orig_sr, target_sr):
    x = sine(1000, 2.0, orig_sr)
    y = resample(x, orig_sr, target_sr)
    assert y.dtype == np.float32
    assert y.shape == (math.ceil(len(x) * target_sr / orig_sr),)
    assert abs(peak_frequency(y, target_sr) - 1000) <= target_sr / len(y)  # within one FFT bin
    assert abs(rms_db(y) - rms_db(x)) < 0.1  # a passband tone keeps its level


def test_resample_multichannel_and_identity():
    stereo = np.stack([sine(300, 1.0, 44100), sine(900, 1.0, 44100)])
    y = resample(stereo, 44100, 16000)
    assert y.shape == (2, 16000)
    assert abs(peak_frequency(y[1], 16000) - 900) <= 1
    same = resample(stereo[0], 44100, 44100)
    np.testing.assert_array_equal(same, stereo[0])
    assert same is not stereo[0]
    with pytest.raises(ValueError, match="target_sr"):
        resample(stereo, 44100, 0)


def test_normalize_peak():
    x = sine(440, 0.5, 16000, amp=0.1)
    y = normalize_peak(x, peak_db=-3.0)
    assert np.max(np.abs(y)) == pytest.approx(10 ** (-3 / 20), rel=1e-5)
    assert peak_frequency(y, 16000) == peak_frequency(x, 16000)
    np.testing.assert_array_equal(normalize_peak(np.zeros(10)), np.zeros(10))
    with pytest.raises(ValueError, match="peak_db"):
        normalize_peak(x, peak_db=1.0)


@pytest.mark.parametrize("target", [-14.0, -23.0])
def test_normalize_loudness_reaches_target(target):
    sr = 44100
    quiet = sine(440, 3.0, sr, amp=0.05)
    y = normalize_loudness(quiet, sr, target_lufs=target)
    assert integrated_lufs(y, sr) == pytest.approx(target, abs=0.1)
    stereo = np.stack([quiet, quiet * 0.5])
    ys = normalize_loudness(stereo, sr, target_lufs=target)
    assert ys.shape == stereo.shape
    assert integrated_lufs(ys, sr) == pytest.approx(target, abs=0.1)


def test_normalize_loudness_respects_peak_ceiling():
    sr = 44100
    clicks = np.zeros(3 * sr, dtype=np.float32)
    clicks[:: sr // 4] = 0.5  # sparse clicks: very low loudness, high peaks
    y = normalize_loudness(clicks, sr, target_lufs=-14.0, max_peak_db=-1.0)
    assert np.max(np.abs(y)) <= 10 ** (-1 / 20) + 1e-6
    assert integrated_lufs(y, sr) < -14.0


def test_normalize_loudness_silent_and_short_inputs():
    sr = 16000
    np.testing.assert_array_equal(normalize_loudness(np.zeros(sr), sr), np.zeros(sr))
    short = sine(440, 0.1, sr, amp=0.1)  # shorter than one 400 ms block
    assert np.max(np.abs(normalize_loudness(short, sr))) == pytest.approx(10 ** (-1 / 20), rel=1e-5)


def test_trim_silence_removes_planted_silence():
    sr = 22050
    tone = sine(440, 2.0, sr)
    x = np.concatenate([np.zeros(sr), tone, np.zeros(sr // 2)])
    y = trim_silence(x, sr, top_db=40)
    frame = 1024  # ~46 ms at 22.05 kHz; trimming works in frames
    assert len(tone) <= len(y) <= len(tone) + 2 * frame
    # what was cut was silence: the trimmed signal has all of the tone's energy
    assert np.sum(y.astype(np.float64) ** 2) == pytest.approx(np.sum(tone.astype(np.float64) ** 2), rel=1e-6)


def test_trim_silence_keeps_inner_silence_and_stereo():
    sr = 16000
    x = np.concatenate([sine(440, 0.5, sr), np.zeros(sr), sine(440, 0.5, sr)])
    assert len(trim_silence(x, sr)) == len(x)
    stereo = np.stack([np.concatenate([np.zeros(sr), sine(440, 1, sr)]), np.zeros(2 * sr)])
    y = trim_silence(stereo, sr)
    assert y.shape[0] == 2 and sr <= y.shape[1] <= sr + 1024


def test_is_silent():
    sr = 16000
    assert is_silent(np.zeros(sr))
    assert is_silent(np.zeros(0))
    assert not is_silent(sine(440, 1, sr, amp=0.5))
    faint = sine(440, 1, sr, amp=10 ** (-70 / 20))
    assert is_silent(faint, threshold_db=-60)
    assert not is_silent(faint, threshold_db=-80)


# --------------------------------------------------------------------------- segmenting


def test_segment_drops_partial_windows_by_default():
    sr = 1000
    x = np.arange(10_500, dtype=np.float32)
    segs = segment(x, sr, segment_s=2.0)
    assert [s.start for s in segs] == [0, 2000, 4000, 6000, 8000]
    for s in segs:
        assert s.audio.shape == (2000,) and s.num_valid == 2000
        np.testing.assert_array_equal(s.audio, x[s.start : s.start + 2000])


def test_segment_keeps_and_pads_partial_window_above_min_s():
    sr = 1000
    x = np.arange(1, 10_501, dtype=np.float32)  # no zeros, so padding is visible
    segs = segment(x, sr, segment_s=2.0, min_s=0.5)
    assert len(segs) == 6
    last = segs[-1]
    assert (last.start, last.num_valid) == (10_000, 500)
    np.testing.assert_array_equal(last.audio[:500], x[10_000:])
    assert not last.audio[500:].any()
    assert segment(x, sr, segment_s=2.0, min_s=0.6)[-1].start == 8000  # 0.5 s tail < min_s


def test_segment_overlapping_windows_cover_signal_once_each():
    sr = 100
    x = np.random.default_rng(1).standard_normal(1050).astype(np.float32)
    segs = segment(x, sr, segment_s=3.0, hop_s=1.0, min_s=0.1)
    starts = [s.start for s in segs]
    assert starts == list(range(0, 900, 100))  # stops at the first window reaching the end
    covered = np.zeros(len(x), dtype=bool)
    for s in segs:
        covered[s.start : s.start + s.num_valid] = True
        np.testing.assert_array_equal(s.audio[: s.num_valid], x[s.start : s.start + s.num_valid])
    assert covered.all()


def test_segment_short_signal_and_stereo():
    sr = 1000
    short = np.ones(700, dtype=np.float32)
    assert segment(short, sr, segment_s=1.0) == []
    (only,) = segment(short, sr, segment_s=1.0, min_s=0.5)
    assert only.audio.shape == (1000,) and only.num_valid == 700
    stereo = np.ones((2, 2500), dtype=np.float32)
    segs = segment(stereo, sr, segment_s=1.0, min_s=0.5)
    assert [s.audio.shape for s in segs] == [(2, 1000)] * 3
    assert segs[-1].num_valid == 500


@pytest.mark.parametrize(
    "kwargs",
    [
        {"segment_s": 0},
        {"segment_s": 1, "hop_s": -1},
        {"segment_s": 1, "min_s": 2},
        {"segment_s": 1, "min_s": 0},
    ],
)
def test_segment_rejects_bad_durations(kwargs):
    with pytest.raises(ValueError):
        segment(np.zeros(100, dtype=np.float32), 100, **kwargs)


# --------------------------------------------------------------------------- pipeline


def test_preprocess_chain():
    sr, target_sr = 44100, 32000
    tone = np.stack([sine(1000, 2.0, sr, amp=0.05), sine(1000, 2.0, sr, amp=0.05)])
    pad = np.zeros((2, sr // 2), dtype=np.float32)
    x = np.concatenate([pad, tone, pad], axis=1)

    y = preprocess(x, sr, target_sr)

    assert y.ndim == 1 and y.dtype == np.float32
    expected = 2.0 * target_sr
    assert expected <= len(y) <= expected + 2 * 2048 * target_sr / sr  # silence gone, frame slack
    assert abs(peak_frequency(y, target_sr) - 1000) <= target_sr / len(y)
    assert integrated_lufs(y, target_sr) == pytest.approx(-14.0, abs=0.2)

    peak = preprocess(x, sr, target_sr, trim_db=None, normalize="peak", peak_db=-2.0)
    assert len(peak) == math.ceil(x.shape[1] * target_sr / sr)
    assert np.max(np.abs(peak)) == pytest.approx(10 ** (-2 / 20), rel=1e-4)
    with pytest.raises(ValueError, match="normalize"):
        preprocess(x, sr, target_sr, normalize="rms")


def test_preprocess_keeps_stereo_for_a_two_channel_model():
    """channels=2 (Stable Audio Open): a stereo source keeps its left/right difference through trim,
    resample and loudness; a mono one becomes dual mono; other channel counts are refused."""
    sr, target_sr = 48000, 44100
    pad = np.zeros((2, sr // 2), dtype=np.float32)
    x = np.concatenate([pad, np.stack([sine(440, 2.0, sr, 0.1), sine(660, 2.0, sr, 0.1)]), pad], axis=1)

    y = preprocess(x, sr, target_sr, channels=2)

    assert y.shape[0] == 2 and y.dtype == np.float32
    assert 2.0 * target_sr <= y.shape[1] <= 2.0 * target_sr + 2 * 2048 * target_sr / sr  # silence trimmed
    resolution = target_sr / y.shape[1]
    assert abs(peak_frequency(y[0], target_sr) - 440) <= resolution
    assert abs(peak_frequency(y[1], target_sr) - 660) <= resolution
    assert integrated_lufs(y, target_sr) == pytest.approx(-14.0, abs=0.2)  # BS.1770 over both channels
    mono = preprocess(x, sr, target_sr)  # the default still mixes down
    assert mono.ndim == 1 and mono.shape[0] == y.shape[1]

    dual = preprocess(sine(440, 1.0, sr), sr, target_sr, channels=2)
    assert dual.shape[0] == 2 and np.array_equal(dual[0], dual[1])
    assert to_channels(x[:1], 2).shape == (2, x.shape[1]) and np.array_equal(to_channels(x, 1), to_mono(x))
    with pytest.raises(ValueError, match="6 channels"):
        preprocess(np.zeros((6, sr), np.float32), sr, target_sr, channels=2)
    with pytest.raises(ValueError, match="channels must be 1"):
        preprocess(x, sr, target_sr, channels=3)
