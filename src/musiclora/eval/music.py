"""Music-theory metrics of one waveform: harmonic accuracy, melodic complexity, rhythmic inconsistency.

Source: seed study 002 (Li, Liu, Mehra: LoRA fine-tuning of Stable Audio Open on
MusicCaps), section V.D "Objective Evaluation":

- Harmonic Accuracy: "the percentage of pitches that belong to a standard scale,
  reporting for the best matching such scale";
- Melodic Complexity: "the number of unique pitches in the music";
- Rhythmic Inconsistency: "the average degree to which pitches are off beat,
  expressed as a percentage of a single beat (quarter note)".

The study computed them on symbolic output of unpublished code; here they are
computed from audio. Pitch comes from librosa's pYIN, which tracks the single
predominant pitch per frame, so on polyphonic audio the metrics describe the
predominant (usually melodic) line.

Stereo: every metric takes mono [L] or channels-first [C, L] audio with C <= 2
(Stable Audio Open's 44.1 kHz stereo) and scores the downmix, the mean of the
channels: the study reports one figure per piece, and a mono or dual-mono clip
scores the same either way. Channels in antiphase cancel in the downmix (no pitch,
no onsets); such a clip raises the metric's "no pitched frames" / "onsets" error.
Any sample rate works (pYIN and the onset detector take `sr`).
"""

from __future__ import annotations

import librosa
import numpy as np

MAJOR_STEPS = (0, 2, 4, 5, 7, 9, 11)
MINOR_STEPS = (0, 2, 3, 5, 7, 8, 10)  # natural minor
PITCH_CLASS_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
FMIN_HZ = 65.406  # C2
FMAX_HZ = 2093.005  # C7


MAX_CHANNELS = 2


def _waveform(y: np.ndarray, sr: int) -> tuple[np.ndarray, int]:
    """Check a waveform and sample rate; return the float32 mono downmix [L] and int Hz.

    `y` is mono [L] or channels-first [C, L] with C <= 2 (the mean of the channels is scored).
    """
    arr = np.asarray(y)
    if arr.ndim == 2 and 1 <= arr.shape[0] <= MAX_CHANNELS:
        arr = arr.astype(np.float32).mean(axis=0)
    elif arr.ndim == 2 and arr.shape[1] <= MAX_CHANNELS < arr.shape[0]:
        raise ValueError(f"y of shape {arr.shape} looks like [L, C] (soundfile's layout); pass y.T, channels first "
                         "[C, L], or a mono waveform [L]")
    if arr.ndim != 1:
        raise ValueError(f"y must be a mono waveform [L] or stereo [C, L] with C <= {MAX_CHANNELS}, "
                         f"got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("y is empty")
    if int(sr) != sr or sr <= 0:
        raise ValueError(f"sr must be a positive integer in Hz, got {sr}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError("y contains NaN or infinite samples")
    return arr, int(sr)


def _stable_runs(notes: np.ndarray, voiced: np.ndarray, min_run_frames: int) -> np.ndarray:
    """Mask of voiced frames whose rounded pitch persists >= min_run_frames consecutive frames."""
    keep = np.zeros(notes.size, dtype=bool)
    start = 0
    for i in range(1, notes.size + 1):
        run_ends = i == notes.size or not voiced[i] or not voiced[start] or notes[i] != notes[start]
        if run_ends:
            if voiced[start] and i - start >= min_run_frames:
                keep[start:i] = True
            start = i
    return keep


def detected_pitches(
    y: np.ndarray,
    sr: int,
    fmin: float = FMIN_HZ,
    fmax: float = FMAX_HZ,
    frame_length: int = 2048,
    hop_length: int = 512,
    min_run_frames: int = 3,
) -> np.ndarray:
    """MIDI pitches of the voiced frames of a clip (librosa pYIN).

    pYIN (Mauch & Dixon 2014) gives one f0 per frame and a voiced flag. Frames at
    note changes often carry an in-between pitch, so a voiced frame is kept only if
    its pitch, rounded to the semitone, lasts `min_run_frames` consecutive voiced
    frames (3 frames = 70 ms at 22.05 kHz, hop 512). A440 tuning is assumed.

    Args:
        y: waveform, mono [L] or stereo [C, L] (C <= 2, scored as the downmix), float in [-1, 1].
        sr: sample rate in Hz.
        fmin: lowest pitch searched, Hz (default C2).
        fmax: highest pitch searched, Hz (default C7).
        frame_length: pYIN frame length in samples.
        hop_length: hop between frames in samples.
        min_run_frames: shortest kept note, in frames; 1 keeps every voiced frame.

    Returns:
        float64 fractional MIDI numbers (69.0 = A4 = 440 Hz), shape [V], one per
        kept frame in time order; V may be 0 (silence, noise).

    Raises:
        ValueError: if `y` is not a non-empty finite [L] or [C <= 2, L] array, `sr` is not positive,
            or `min_run_frames` < 1.
    """
    wav, rate = _waveform(y, sr)
    if min_run_frames < 1:
        raise ValueError(f"min_run_frames must be >= 1, got {min_run_frames}")
    f0, voiced, _ = librosa.pyin(
        wav, fmin=fmin, fmax=fmax, sr=rate, frame_length=frame_length, hop_length=hop_length
    )
    voiced = voiced & np.isfinite(f0)
    midi = np.full(f0.shape, np.nan)
    midi[voiced] = librosa.hz_to_midi(f0[voiced])
    notes = np.where(voiced, np.round(np.nan_to_num(midi)), -1).astype(np.int64)
    keep = _stable_runs(notes, voiced, min_run_frames)
    return midi[keep].astype(np.float64)


def _pitches(y: np.ndarray, sr: int, pitches: np.ndarray | None) -> np.ndarray:
    """Rounded MIDI pitches (int64 [V]) from `pitches` or, when None, from `detected_pitches(y, sr)`."""
    return _rounded(detected_pitches(y, sr) if pitches is None else pitches)


def _rounded(pitches: np.ndarray) -> np.ndarray:
    """Check MIDI pitches and round them to int64 semitones, shape [V]."""
    midi = np.asarray(pitches, dtype=np.float64).ravel()
    if midi.size == 0:
        raise ValueError("no pitched frames detected in y (silence, noise or unpitched percussion?)")
    if not np.isfinite(midi).all():
        raise ValueError("pitches contains NaN or infinite values")
    return np.round(midi).astype(np.int64)


def best_key(pitches: np.ndarray) -> tuple[str, float]:
    """Major or natural-minor key whose scale holds the largest share of the pitches.

    All 24 keys (12 tonics x major / natural minor) are tried; on a tie the first
    in the order C major, C minor, C# major, ... wins (so C major beats A minor).

    Args:
        pitches: MIDI pitches, shape [V], V >= 1; rounded to the nearest semitone.

    Returns:
        (key name such as "C major", share of pitches inside that scale in %).

    Raises:
        ValueError: if `pitches` is empty or not finite.
    """
    notes = _rounded(pitches)
    counts = np.bincount(notes % 12, minlength=12)
    best_name, best_share = "", -1.0
    for tonic in range(12):
        for mode, steps in (("major", MAJOR_STEPS), ("minor", MINOR_STEPS)):
            share = counts[[(tonic + s) % 12 for s in steps]].sum() / notes.size
            if share > best_share:
                best_name, best_share = f"{PITCH_CLASS_NAMES[tonic]} {mode}", float(share)
    return best_name, 100.0 * best_share


def harmonic_accuracy(y: np.ndarray, sr: int, pitches: np.ndarray | None = None) -> float:
    """Share of detected pitches inside the best-fitting major or minor scale, in %.

    Source: seed study 002, "Harmonic Accuracy": percentage of pitches that belong
    to a standard scale, for the best matching scale. Standard scales here: the 12
    major and 12 natural-minor scales (see `best_key`). Each kept pYIN frame counts
    once, so a pitch weighs by its duration.

    Args:
        y: waveform, mono [L] or stereo [C, L] (C <= 2, scored as the downmix), float in [-1, 1].
        sr: sample rate in Hz.
        pitches: optional MIDI pitches [V] already detected (e.g. by
            `detected_pitches`), to avoid running pYIN again; then `y` is not read.

    Returns:
        Percentage in [0, 100] as a Python float (100 for a diatonic melody).

    Raises:
        ValueError: if no pitched frame is found, or `y` / `sr` are invalid.
    """
    return best_key(_pitches(y, sr, pitches))[1]


def melodic_complexity(y: np.ndarray, sr: int, pitches: np.ndarray | None = None) -> int:
    """Number of distinct MIDI pitches (octave-aware) among the detected pitches.

    Source: seed study 002, "Melodic Complexity: the number of unique pitches in the
    music". Unique pitches are read as distinct semitones, so C4 and C5 count
    twice; short transitional frames are dropped by `detected_pitches`.

    Args:
        y: waveform, mono [L] or stereo [C, L] (C <= 2, scored as the downmix), float in [-1, 1].
        sr: sample rate in Hz.
        pitches: optional MIDI pitches [V] already detected; then `y` is not read.

    Returns:
        Count of distinct rounded MIDI pitches, a Python int >= 1.

    Raises:
        ValueError: if no pitched frame is found, or `y` / `sr` are invalid.
    """
    return int(np.unique(_pitches(y, sr, pitches)).size)


def _beat_period(wav: np.ndarray, sr: int, hop_length: int) -> float:
    """Beat period in s from librosa's beat tracker, refined by a line fit to the beat times."""
    tempo, beats = librosa.beat.beat_track(y=wav, sr=sr, hop_length=hop_length, units="time")
    tempo = float(np.atleast_1d(tempo)[0])
    if beats.size >= 3:
        guess = float(np.median(np.diff(beats)))
        index = np.round((beats - beats[0]) / guess)
        return float(np.polyfit(index, beats, 1)[0])
    if tempo <= 0:
        raise ValueError("no tempo found in y; pass bpm explicitly")
    return 60.0 / tempo


def _grid_deviation(onsets: np.ndarray, period: float, offset_s: float | None) -> np.ndarray:
    """Distance of each onset to the nearest point of the grid offset + k * period, in beats [0, 0.5]."""

    def deviation(offset: float) -> np.ndarray:
        phase = np.mod(onsets - offset, period) / period
        return np.minimum(phase, 1.0 - phase)

    if offset_s is not None:
        return deviation(offset_s)
    # The circular L1 median lies at a data point, so the best offset is one of the onsets.
    candidates = [deviation(t) for t in onsets]
    return candidates[int(np.argmin([c.mean() for c in candidates]))]


def rhythmic_inconsistency(
    y: np.ndarray,
    sr: int,
    bpm: float | None = None,
    offset_s: float | None = None,
    hop_length: int = 256,
) -> float:
    """Mean distance of the onsets from the nearest beat of a steady grid, in % of a beat.

    Source: seed study 002, "Rhythmic Inconsistency: the average degree to which
    pitches are off beat, expressed as a percentage of a single beat (quarter
    note)". Onsets from `librosa.onset.onset_detect`. The grid has period 60 / bpm;
    without `bpm`, the period is a least-squares line through the beats of
    `librosa.beat.beat_track` (steadier than its quantised tempo). Without
    `offset_s`, the grid phase is the one minimising the result, which also absorbs
    the detector's constant onset latency. Onset times are quantised to
    `hop_length` samples, so a perfectly steady clip scores about 1 % rather than 0.

    Args:
        y: waveform, mono [L] or stereo [C, L] (C <= 2, scored as the downmix), float in [-1, 1].
        sr: sample rate in Hz.
        bpm: tempo in quarter notes per minute; None estimates it.
        offset_s: time of one grid beat in s; None fits it to the onsets.
        hop_length: onset-detection hop in samples (time resolution).

    Returns:
        Mean onset deviation in % of a beat, a Python float in [0, 50].

    Raises:
        ValueError: if `y` / `sr` are invalid, `bpm` is not positive, fewer than
            two onsets are found, or no tempo can be estimated.
    """
    wav, rate = _waveform(y, sr)
    if bpm is not None and not bpm > 0:
        raise ValueError(f"bpm must be positive, got {bpm}")
    onsets = librosa.onset.onset_detect(y=wav, sr=rate, hop_length=hop_length, units="time")
    if onsets.size < 2:
        raise ValueError(f"rhythmic_inconsistency needs at least 2 onsets in y, found {onsets.size}")
    period = 60.0 / bpm if bpm is not None else _beat_period(wav, rate, hop_length)
    return float(100.0 * _grid_deviation(onsets, period, offset_s).mean())
