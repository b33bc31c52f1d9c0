"""Decode audio files and the waveform primitives that every family's preprocessing uses.

Conventions for the whole module:

- Waveforms are numpy float32, full scale is [-1, 1].
- Multichannel audio is ``[C, L]`` (channels first: C channels, L samples); mono is ``[L]``.
  Functions that accept both say so.
- Sample rates are int Hz (``sr``), durations float seconds (``*_s``), levels dB relative to
  full scale (dBFS) or LUFS (ITU-R BS.1770 integrated loudness).

Decoding uses soundfile (libsndfile: WAV, FLAC, Ogg Vorbis, Ogg Opus, MP3 since libsndfile 1.1),
with librosa as a fallback for compressed formats libsndfile does not read (m4a/aac/wma via audioread,
which needs ffmpeg or GStreamer on the machine). No torchaudio.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import BinaryIO, Literal, NamedTuple

import numpy as np
import soundfile as sf

# Suffixes for which a libsndfile failure is worth a second try through librosa/audioread.
_FALLBACK_SUFFIXES = frozenset({".mp3", ".m4a", ".mp4", ".aac", ".wma", ".webm"})
# libsndfile's extra_info line for a WAV/AIFF whose data chunk is longer than the file, e.g.
# "data : 96000 (should be 47978)". Streamed WAVs write placeholder sizes, which are not truncation.
_DATA_MISMATCH = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_PLACEHOLDER_SIZES = frozenset({0, 0xFFFFFFFF, 0x7FFFFFFF, 0xFFFFFFFF - 1})
# A compressed stream's header frame count is an estimate (Vorbis granule positions, MP3 Xing
# headers): real files decode up to ~0.1 % short (wesnoth's northerners.ogg: 5806 of 9.1 M frames).
_FRAME_SLACK = 2 * 1152
_FRAME_SLACK_FRACTION = 0.01


class AudioDecodeError(ValueError):
    """An input could not be decoded into audio samples.

    Attributes:
        path: the file name or label of the input, as given to `load_audio`.
        reason: what was wrong, in words.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode audio {self.path!r}: {reason}")

    def __reduce__(self):  # keep both fields when pickled across processes (Ray tasks)
        return (type(self), (self.path, self.reason))


class Segment(NamedTuple):
    """One fixed-length window cut by `segment`.

    Attributes:
        start: index of the window's first sample in the source waveform.
        audio: float32 window, shape [N] (or [C, N] for multichannel input) with
            N = round(segment_s * sr); samples at and past `num_valid` are zero padding.
        num_valid: how many leading samples of `audio` are real audio (1 <= num_valid <= N).
            A validity mask is ``np.arange(N) < num_valid``.
    """

    start: int
    audio: np.ndarray
    num_valid: int


def _label(source: str | os.PathLike | BinaryIO, name: str | None) -> str:
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", None) or "<file object>")


def _check_nonempty(source: str | os.PathLike | BinaryIO, label: str) -> None:
    """Raise for a missing, directory or zero-byte input before libsndfile sees it."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"audio file not found: {label!r}")
        if path.is_dir():
            raise AudioDecodeError(label, "is a directory, not an audio file")
        if path.stat().st_size == 0:
            raise AudioDecodeError(label, "file is empty (0 bytes)")
        return
    if hasattr(source, "seekable") and source.seekable():
        here = source.tell()
        end = source.seek(0, os.SEEK_END)
        source.seek(here)
        if end - here <= 0:
            raise AudioDecodeError(label, "file is empty (0 bytes)")


def _read_soundfile(source: str | os.PathLike | BinaryIO, label: str) -> tuple[np.ndarray, int]:
    """Decode with libsndfile; returns float32 [L, C] and the sample rate in Hz."""
    with sf.SoundFile(source) as f:
        sr = int(f.samplerate)
        declared = int(f.frames)
        extra = f.extra_info
        data = f.read(dtype="float32", always_2d=True)
    mismatch = _DATA_MISMATCH.search(extra)
    if mismatch:
        claimed, actual = int(mismatch.group(1)), int(mismatch.group(2))
        if actual < claimed and claimed not in _PLACEHOLDER_SIZES:
            raise AudioDecodeError(
                label, f"truncated: the data chunk declares {claimed} bytes but the file holds {actual}"
            )
    if declared > 0 and data.shape[0] + max(_FRAME_SLACK, _FRAME_SLACK_FRACTION * declared) < declared:
        raise AudioDecodeError(
            label, f"truncated: the header declares {declared} frames but only {data.shape[0]} decode"
        )
    return data, sr


def _read_librosa(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Decode with librosa (audioread backend); returns float32 [L, C] and the sample rate in Hz."""
    import librosa

    y, sr = librosa.load(os.fspath(path), sr=None, mono=False, dtype=np.float32)
    y = np.atleast_2d(y)  # [C, L]
    return np.ascontiguousarray(y.T), int(sr)


def load_audio(source: str | os.PathLike | BinaryIO, name: str | None = None) -> tuple[np.ndarray, int]:
    """Decode an audio file into a float32 waveform at its native sample rate.

    Args:
        source: a local path, or a binary file object positioned at the start of the audio
            (e.g. from ``fsspec.open(url, "rb")``; it must be seekable).
        name: label used in error messages; defaults to the path or the file object's ``name``.

    Returns:
        ``(audio, sr)``: audio is float32, shape [C, L] (C >= 1 channels, L >= 1 samples, full
        scale [-1, 1]); sr is the native sample rate in Hz. Nothing is resampled or mixed down.

    Raises:
        FileNotFoundError: if `source` is a path that does not exist.
        AudioDecodeError: if the input is empty (0 bytes), a directory, not audio, truncated
            (the header promises more data than the file holds; for compressed streams, more
            than 1 % more frames than decode), holds zero samples, or decodes
            to non-finite values. The message names the file and the reason.
    """
    label = _label(source, name)
    _check_nonempty(source, label)
    try:
        data, sr = _read_soundfile(source, label)
    except AudioDecodeError:
        raise
    except (sf.SoundFileError, RuntimeError) as exc:
        suffix = Path(os.fspath(source)).suffix.lower() if isinstance(source, (str, os.PathLike)) else ""
        if suffix not in _FALLBACK_SUFFIXES:
            raise AudioDecodeError(label, f"not readable as audio by libsndfile ({exc})") from exc
        try:
            data, sr = _read_librosa(source)
        except Exception as exc2:  # audioread raises its own NoBackendError and OSErrors
            raise AudioDecodeError(label, f"libsndfile: {exc}; librosa/audioread: {exc2!r}") from exc2
    if data.shape[0] == 0:
        raise AudioDecodeError(label, "contains no audio samples (zero length)")
    if not np.isfinite(data).all():
        raise AudioDecodeError(label, "decodes to NaN or infinite sample values")
    return np.ascontiguousarray(data.T), sr


def to_mono(x: np.ndarray) -> np.ndarray:
    """Mix a waveform down to one channel by averaging the channels.

    Args:
        x: float waveform, shape [C, L] or already mono [L].

    Returns:
        float32 waveform, shape [L].

    Raises:
        ValueError: if `x` is not 1-D or 2-D.
    """
    x = np.asarray(x)
    if x.ndim == 1:
        return x.astype(np.float32, copy=False)
    if x.ndim == 2:
        return x.mean(axis=0, dtype=np.float32)
    raise ValueError(f"to_mono expects audio of shape [C, L] or [L], got shape {x.shape}")


def to_channels(x: np.ndarray, channels: int = 1) -> np.ndarray:
    """Give a waveform the channel count a model takes.

    Args:
        x: float waveform, shape [C, L] or mono [L].
        channels: 1 (mono, the downmix of `to_mono`) or 2 (stereo: a stereo source as it is, a mono
            source, [L] or [1, L], duplicated to dual mono).

    Returns:
        float32 waveform: [L] for `channels` 1, else [channels, L].

    Raises:
        ValueError: `channels` is not 1 or 2, `x` is not 1-D or 2-D, or `x` has a channel count other
            than 1 or `channels` (a 5.1 file for a stereo model: mix it down to stereo first).
    """
    if channels not in (1, 2):
        raise ValueError(f"channels must be 1 (mono) or 2 (stereo), got {channels!r}")
    if channels == 1:
        return to_mono(x)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"to_channels expects audio of shape [C, L] or [L], got shape {x.shape}")
    if x.shape[0] == 1:
        return np.repeat(x, channels, axis=0)
    if x.shape[0] != channels:
        raise ValueError(f"audio has {x.shape[0]} channels; a {channels}-channel model takes mono or "
                         f"{channels}-channel input")
    return x


def num_channels(x: np.ndarray) -> int:
    """Channels of a waveform [L] (1) or [C, L] (C). Raises ValueError when `x` is neither."""
    x = np.asarray(x)
    if x.ndim not in (1, 2):
        raise ValueError(f"audio must be mono [L] or channels-first [C, L], got shape {x.shape}")
    return 1 if x.ndim == 1 else int(x.shape[0])


def _mono_or_stereo(x: np.ndarray, label: str) -> np.ndarray:
    """`x` as float32 [L] or [C, L] with C = 1 or 2; a ValueError names `label` (and an [L, C] layout)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 2 and x.shape[1] <= 2 < x.shape[0]:
        raise ValueError(f"{label} of shape {x.shape} looks like [L, C] (soundfile's layout); pass channels "
                         "first [C, L], or mono [L]")
    if x.ndim not in (1, 2) or (x.ndim == 2 and x.shape[0] > 2) or x.shape[-1] == 0:
        raise ValueError(f"{label} must be mono [L] or [C, L] with C = 1 or 2 and L > 0, got shape {x.shape}")
    return x


def save_audio(dest: str | os.PathLike | BinaryIO, x: np.ndarray, sample_rate: int,
               audio_format: str = "WAV") -> None:
    """Write a float waveform as a 16-bit PCM file, keeping its channels (the inverse of `load_clip`).

    soundfile writes frames-first [L, C]; this transposes, so [2, L] is a 2-channel file.

    Args:
        dest: a path (its folder is made), or a writable binary file object.
        x: float mono [L] or channels-first [C, L], C = 1 or 2 (what `ModelFamily.generate` returns);
            clipped to [-1, 1].
        sample_rate: Hz.
        audio_format: libsndfile container, "WAV" or "FLAC" (any case).

    Raises:
        ValueError: `x` is empty or not [L] / [C <= 2, L] (an [L, C] array is named as such), or
            `audio_format` is neither WAV nor FLAC.
    """
    x = _mono_or_stereo(x, "audio")
    if audio_format.upper() not in ("WAV", "FLAC"):
        raise ValueError(f"audio_format must be WAV or FLAC, got {audio_format!r}")
    if isinstance(dest, (str, os.PathLike)):
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
    sf.write(dest, np.clip(x.T, -1.0, 1.0), int(sample_rate), subtype="PCM_16", format=audio_format.upper())


def load_clip(source: str | os.PathLike | BinaryIO, name: str | None = None) -> tuple[np.ndarray, int]:
    """`load_audio` in `ModelFamily.generate`'s layout: (float32 mono [L] for a 1-channel file, else
    [C, L]; sr in Hz). Raises as `load_audio`."""
    wav, sr = load_audio(source, name)
    return (wav[0] if wav.shape[0] == 1 else wav), sr


def resample(x: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Change the sample rate with librosa's ``soxr_hq`` resampler (band-limited, high quality).

    Args:
        x: float waveform, shape [L] or [C, L]; resampled along the last axis.
        orig_sr: sample rate of `x` in Hz.
        target_sr: wanted sample rate in Hz.

    Returns:
        float32 waveform, shape [L'] or [C, L'] with L' = ceil(L * target_sr / orig_sr).
        A copy of `x` when the rates are equal.

    Raises:
        ValueError: if either rate is not a positive integer.
    """
    for label, rate in (("orig_sr", orig_sr), ("target_sr", target_sr)):
        if int(rate) != rate or rate <= 0:
            raise ValueError(f"resample: {label} must be a positive integer number of Hz, got {rate!r}")
    x = np.asarray(x, dtype=np.float32)
    if orig_sr == target_sr:
        return x.copy()
    import librosa

    y = librosa.resample(x, orig_sr=int(orig_sr), target_sr=int(target_sr), res_type="soxr_hq", axis=-1)
    return y.astype(np.float32, copy=False)


def _peak(x: np.ndarray) -> float:
    return float(np.max(np.abs(x))) if x.size else 0.0


def normalize_peak(x: np.ndarray, peak_db: float = -1.0) -> np.ndarray:
    """Scale a waveform so its largest absolute sample sits at `peak_db` dBFS.

    Args:
        x: float waveform, shape [L] or [C, L]; one gain for all channels.
        peak_db: target peak in dBFS, <= 0 (-1.0 leaves 1 dB of headroom).

    Returns:
        float32 waveform of the same shape. An all-zero or empty input is returned unchanged (copy).

    Raises:
        ValueError: if `peak_db` is above 0 dBFS.
    """
    if peak_db > 0:
        raise ValueError(f"normalize_peak: peak_db must be <= 0 dBFS, got {peak_db}")
    x = np.asarray(x, dtype=np.float32)
    peak = _peak(x)
    if peak == 0.0:
        return x.copy()
    return (x * np.float32(10.0 ** (peak_db / 20.0) / peak)).astype(np.float32)


def normalize_loudness(
    x: np.ndarray, sr: int, target_lufs: float = -14.0, max_peak_db: float | None = -1.0
) -> np.ndarray:
    """Scale a waveform to a target integrated loudness (ITU-R BS.1770-4, via pyloudnorm).

    The loudness is K-weighted and gated as in BS.1770-4 (400 ms blocks, 75 % overlap). After the
    gain, if the peak would exceed `max_peak_db`, the whole signal is turned down to that peak, so
    loud-peaked music can end up quieter than `target_lufs` rather than clipping.

    Args:
        x: float waveform, shape [L] or [C, L]; one gain for all channels.
        sr: sample rate of `x` in Hz.
        target_lufs: wanted integrated loudness in LUFS (-14 is common for streamed music).
        max_peak_db: ceiling for the output peak in dBFS, or None for no ceiling.

    Returns:
        float32 waveform of the same shape. Silent input (loudness -inf) is returned unchanged
        (copy). Input shorter than one 400 ms block has no defined loudness: it is
        peak-normalised to `max_peak_db` (or -1 dBFS) instead.

    Raises:
        ValueError: if `x` is not 1-D or 2-D.
    """
    import pyloudnorm

    x = np.asarray(x, dtype=np.float32)
    if x.ndim not in (1, 2):
        raise ValueError(f"normalize_loudness expects audio of shape [C, L] or [L], got shape {x.shape}")
    meter = pyloudnorm.Meter(int(sr))
    if x.shape[-1] <= int(meter.block_size * sr):
        return normalize_peak(x, -1.0 if max_peak_db is None else min(max_peak_db, 0.0))
    loudness = meter.integrated_loudness(x.T.astype(np.float64))  # pyloudnorm wants [L] or [L, C]
    if not math.isfinite(loudness):
        return x.copy()
    y = x * np.float32(10.0 ** ((target_lufs - loudness) / 20.0))
    if max_peak_db is not None:
        ceiling = 10.0 ** (max_peak_db / 20.0)
        peak = _peak(y)
        if peak > ceiling:
            y = y * np.float32(ceiling / peak)
    return y.astype(np.float32, copy=False)


def _trim_frame_length(sr: int) -> int:
    """A power-of-two analysis window of about 46 ms (2048 samples at 44.1 and 48 kHz)."""
    return max(64, 2 ** round(math.log2(0.0464 * sr)))


def trim_silence(x: np.ndarray, sr: int, top_db: float = 40.0) -> np.ndarray:
    """Cut leading and trailing silence (``librosa.effects.trim``).

    A frame (about 46 ms, hop a quarter of that) counts as silent when its RMS is more than
    `top_db` dB below the loudest frame of the signal. Silence inside the signal is kept.

    Args:
        x: float waveform, shape [L] or [C, L] (a frame is kept if any channel is loud enough).
        sr: sample rate in Hz (sets the frame length).
        top_db: threshold in dB below the loudest frame.

    Returns:
        float32 waveform, shape [L'] or [C, L'], L' <= L, a copy. Frame resolution means up to
        one hop of quiet audio can remain at each end. An all-zero input is returned whole.
    """
    import librosa

    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] == 0:
        return x.copy()
    frame = _trim_frame_length(int(sr))
    y, _ = librosa.effects.trim(x, top_db=top_db, frame_length=frame, hop_length=frame // 4)
    return np.ascontiguousarray(y, dtype=np.float32)


def leading_silence_s(x: np.ndarray, sr: int, top_db: float | None = 40.0) -> float:
    """Seconds `trim_silence` cuts from the start of `x` (0 when `top_db` is None).

    Lets a segment of the trimmed audio name its time in the original file, e.g. to read a
    paired stem over the same window.

    Args:
        x: float waveform, shape [L] or [C, L], at `sr` Hz.
        sr: sample rate in Hz.
        top_db: the `trim_silence` threshold; None means no trimming.
    """
    import librosa

    if top_db is None or x.shape[-1] == 0:
        return 0.0
    frame = _trim_frame_length(int(sr))
    _, (start, _end) = librosa.effects.trim(np.asarray(to_mono(x), np.float32), top_db=top_db, frame_length=frame,
                                            hop_length=frame // 4)
    return float(start) / sr


def rms_db(x: np.ndarray) -> float:
    """Root-mean-square level of a waveform in dBFS (a full-scale square wave is 0 dBFS).

    Args:
        x: float waveform, any shape; all samples pooled.

    Returns:
        20 * log10(RMS); -inf for an empty or all-zero input.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return -math.inf
    rms = math.sqrt(float(np.mean(x * x)))
    return 20.0 * math.log10(rms) if rms > 0 else -math.inf


def is_silent(x: np.ndarray, threshold_db: float = -60.0) -> bool:
    """Whether a waveform's overall RMS level is below `threshold_db` dBFS.

    Args:
        x: float waveform, shape [L] or [C, L].
        threshold_db: level in dBFS under which the signal counts as silent.

    Returns:
        True for an empty input, all zeros, or RMS level < threshold_db.
    """
    return rms_db(x) < threshold_db


def segment(
    x: np.ndarray, sr: int, segment_s: float, hop_s: float | None = None, min_s: float | None = None
) -> list[Segment]:
    """Cut a waveform into fixed-length windows.

    Windows of N = round(segment_s * sr) samples start every H = round(hop_s * sr) samples. The
    walk stops at the first window that reaches the end of the signal, so no window is a strict
    subset of an earlier one. That last window may be partial: it is kept only if it holds at
    least round(min_s * sr) real samples, and is then zero-padded to N (`Segment.num_valid` says
    how many samples are real). A signal shorter than N gives at most that one padded window.

    Args:
        x: float waveform, shape [L] or [C, L]; cut along the last axis.
        sr: sample rate in Hz.
        segment_s: window length in seconds, > 0.
        hop_s: seconds between window starts, > 0; defaults to `segment_s` (no overlap).
        min_s: shortest partial window kept, in seconds, in (0, segment_s]; defaults to
            `segment_s`, i.e. partial windows are dropped.

    Returns:
        Segments in order of `start`; each `audio` is float32, shape [N] or [C, N]. Empty when
        the signal is shorter than `min_s`.

    Raises:
        ValueError: if a duration is out of range, or `x` is not 1-D or 2-D.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim not in (1, 2):
        raise ValueError(f"segment expects audio of shape [C, L] or [L], got shape {x.shape}")
    hop_s = segment_s if hop_s is None else hop_s
    min_s = segment_s if min_s is None else min_s
    if segment_s <= 0 or hop_s <= 0:
        raise ValueError(f"segment: segment_s and hop_s must be > 0, got {segment_s} and {hop_s}")
    if not 0 < min_s <= segment_s:
        raise ValueError(f"segment: min_s must be in (0, segment_s={segment_s}], got {min_s}")
    n = max(1, round(segment_s * sr))
    hop = max(1, round(hop_s * sr))
    min_len = max(1, min(n, round(min_s * sr)))
    length = x.shape[-1]
    out: list[Segment] = []
    start = 0
    while start < length:
        valid = min(n, length - start)
        if valid >= min_len:
            window = np.zeros(x.shape[:-1] + (n,), dtype=np.float32)
            window[..., :valid] = x[..., start : start + valid]
            out.append(Segment(start, window, valid))
        if start + n >= length:
            break
        start += hop
    return out


def preprocess(
    x: np.ndarray,
    sr: int,
    target_sr: int,
    *,
    channels: int = 1,
    trim_db: float | None = 40.0,
    normalize: Literal["loudness", "peak"] | None = "loudness",
    target_lufs: float = -14.0,
    peak_db: float = -1.0,
) -> np.ndarray:
    """The standard chain: mono (or the model's channels) -> trim silence -> resample -> normalise.

    Trimming runs before resampling so the resampler does not work on silence. With `channels` 2
    (Stable Audio Open's stereo) a stereo source keeps its two channels and a mono one is
    duplicated (see `to_channels`); trimming keeps a frame where any channel is loud enough, and
    loudness normalisation applies one gain to both channels (BS.1770 sums the channels).

    Args:
        x: float waveform, shape [C, L] or [L], at `sr`.
        sr: sample rate of `x` in Hz.
        target_sr: output sample rate in Hz (e.g. 32000 for MusicGen's EnCodec, 16000 for AudioLDM).
        channels: output channels, 1 (mono downmix, the default) or 2 (`ModelFamily.channels`).
        trim_db: `trim_silence` threshold in dB below the loudest frame; None skips trimming.
        normalize: "loudness" (`normalize_loudness` to `target_lufs`, peak ceiling `peak_db`),
            "peak" (`normalize_peak` to `peak_db`), or None.
        target_lufs: integrated loudness target in LUFS for "loudness".
        peak_db: peak target (for "peak") or ceiling (for "loudness") in dBFS.

    Returns:
        float32 waveform at `target_sr`: mono [L'] for `channels` 1, else [channels, L'].

    Raises:
        ValueError: for a bad shape, channel count, sample rate or `normalize` value.
    """
    if normalize not in ("loudness", "peak", None):
        raise ValueError(f"preprocess: normalize must be 'loudness', 'peak' or None, got {normalize!r}")
    y = to_channels(x, channels)
    if trim_db is not None:
        y = trim_silence(y, sr, top_db=trim_db)
    y = resample(y, sr, target_sr)
    if normalize == "loudness":
        y = normalize_loudness(y, target_sr, target_lufs=target_lufs, max_peak_db=peak_db)
    elif normalize == "peak":
        y = normalize_peak(y, peak_db=peak_db)
    return y


def check_clips(wavs: list[np.ndarray], min_samples: int = 1) -> list[np.ndarray]:
    """Validate a list of clips for an embedder and mix each down to mono.

    Args:
        wavs: float mono [L_i] or [C, L_i] with C = 1 or 2 (a stereo family's output: its `to_mono` is embedded).
        min_samples: the shortest clip accepted, in samples.

    Returns:
        the clips as float32 mono [L_i] arrays.

    Raises:
        ValueError: an empty list, a clip that is not [L] or [C <= 2, L] (an [L, C] array is named as
            such) or shorter than `min_samples`, or one with NaN / infinite samples (names its index).
    """
    if len(wavs) == 0:
        raise ValueError("wavs is empty: need at least one clip")
    out = []
    for i, wav in enumerate(wavs):
        arr = to_mono(_mono_or_stereo(wav, f"wavs[{i}]"))
        if arr.size < min_samples:
            raise ValueError(f"wavs[{i}] must be mono [L] or [C <= 2, L] with L >= {min_samples}, got {np.shape(wav)}")
        if not np.isfinite(arr).all():
            raise ValueError(f"wavs[{i}] contains NaN or infinite samples")
        out.append(arr)
    return out


def load_window(url: str, start_s: float, duration_s: float, sample_rate: int) -> np.ndarray:
    """Decode `duration_s` seconds of a file from `start_s`, as mono float32 at `sample_rate` Hz.

    For paired conditioning audio (a stem, a sung or hummed take) read over the window of the
    segment it conditions.

    Args:
        url: local path or fsspec URL of the audio file.
        start_s: window start in seconds.
        duration_s: window length in seconds.
        sample_rate: output rate in Hz.

    Returns:
        float32 [L] with L <= round(duration_s * sample_rate) (shorter where the file ends early).

    Raises:
        AudioDecodeError: the file cannot be decoded.
        FileNotFoundError: nothing at `url`.
    """
    from musiclora.storage import open_url

    with open_url(url, "rb") as f:
        wav, sr = load_audio(f, name=url)
    clip = to_mono(wav)[int(start_s * sr) : int((start_s + duration_s) * sr)]
    return resample(clip, sr, sample_rate)
