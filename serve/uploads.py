"""Bounded decoding of an uploaded melody / reference clip.

A compressed upload can hold far more audio than its size suggests (10 MiB of silent FLAC or
8 kbps MP3 is hours of audio, gigabytes as float32). So the duration is read from the header
first (`soundfile.info`), a header over the limit is refused before any sample is decoded, and
decoding itself stops at the limit, mixing down to mono block by block: memory stays at one mono
clip of `max_seconds`, whatever the header claims (a streamed file whose header gives no length,
or a lying one). Only libsndfile decodes (WAV, FLAC, OGG/Vorbis/Opus, MP3); nothing is unpickled.
"""

from __future__ import annotations

import io

import numpy as np

MAX_SAMPLE_RATE = 192_000
"""Highest upload sample rate in Hz."""
MAX_CHANNELS = 8
BLOCK_FRAMES = 65_536


class UploadError(ValueError):
    """An upload refused; `status` is the HTTP status to answer with (413 too long, 415 not audio)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


def decode_upload(data: bytes, max_seconds: float, name: str = "melody") -> tuple[np.ndarray, int]:
    """Decode uploaded audio to mono, reading at most `max_seconds` of it.

    Args:
        data: the uploaded file's bytes.
        max_seconds: longest accepted audio, seconds > 0.
        name: what the upload is called in messages.

    Returns:
        (float32 mono waveform [L] with 0 < L <= max_seconds * sample_rate, sample rate in Hz).

    Raises:
        UploadError: 415 when it is not audio libsndfile reads, has an unsupported sample rate or
            channel count, no samples, or non-finite samples; 413 when its header or its decoded
            data is longer than `max_seconds` (the message names the limit).
    """
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
    except (sf.SoundFileError, RuntimeError, EOFError) as exc:
        raise UploadError(415, f"{name} is not decodable audio (WAV, FLAC, OGG or MP3 expected): {exc}") from exc
    sr, channels = int(info.samplerate), int(info.channels)
    if not 0 < sr <= MAX_SAMPLE_RATE or not 0 < channels <= MAX_CHANNELS:
        raise UploadError(415, f"{name}: {sr} Hz with {channels} channels is not supported; expected at most "
                               f"{MAX_SAMPLE_RATE} Hz and {MAX_CHANNELS} channels")
    cap = int(max_seconds * sr)
    known = 0 < info.frames < 2**62  # libsndfile gives SF_COUNT_MAX when the header has no length
    if known and info.frames > cap:
        raise UploadError(413, f"{name} is {info.frames / sr:.1f} s long (per its header); the limit is {max_seconds} s")
    return _read_capped(data, sr, cap, max_seconds, name), sr


def _read_capped(data: bytes, sr: int, cap: int, max_seconds: float, name: str) -> np.ndarray:
    import soundfile as sf

    parts, total = [], 0
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            while total < cap:
                block = f.read(min(BLOCK_FRAMES, cap - total), dtype="float32", always_2d=True)
                if block.shape[0] == 0:
                    break
                parts.append(block.mean(axis=1))
                total += block.shape[0]
            if total >= cap and f.read(1, dtype="float32").shape[0] > 0:
                raise UploadError(413, f"{name} decodes to more than the limit of {max_seconds} s")
    except (sf.SoundFileError, RuntimeError, EOFError) as exc:
        raise UploadError(415, f"{name} is not decodable audio: {exc}") from exc
    if total == 0:
        raise UploadError(415, f"{name} contains no audio samples")
    mono = np.concatenate(parts)
    if not np.isfinite(mono).all():
        raise UploadError(415, f"{name} decodes to NaN or infinite sample values")
    return mono
