"""Simple music analysis for captions: key, tempo, and the words that describe them.

- Key: the Krumhansl-Schmuckler algorithm. The track's mean chroma is correlated with the 24
  rotations of the Krumhansl-Kessler major and minor key profiles (C. L. Krumhansl, "Cognitive
  Foundations of Musical Pitch", 1990, table 4.1 / Krumhansl & Kessler 1982); the best
  correlation names the key.
- Tempo: librosa's onset-autocorrelation estimate (`librosa.feature.tempo`, Ellis 2007 "Beat
  tracking by dynamic programming", with its log-normal prior around 120 BPM).

Both run on a mono excerpt from the middle of the track at 22.05 kHz, so they cost well under a
second per track. They are estimates: metadata (tags, a score's own key and tempo marks, an
album.json's bpm) wins over them wherever it exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

PITCH_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
_ALIASES = {"Db": "C#", "D#": "Eb", "Gb": "F#", "G#": "Ab", "A#": "Bb", "Cb": "B", "B#": "C", "E#": "F", "Fb": "E"}
# Krumhansl-Kessler probe-tone profiles, tonic first.
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
ANALYSIS_SR = 22_050
MIN_ANALYSIS_S = 10.0
_KEY_RE = re.compile(r"^([A-Ga-g])([#b-]?)\s+(major|minor)$")


@dataclass(frozen=True)
class AudioAnalysis:
    """What `analyse_audio` found.

    Attributes:
        bpm: estimated tempo in beats per minute, rounded to an integer.
        key: estimated key, e.g. "A minor" (see `PITCH_NAMES` for the spellings).
        key_strength: Pearson correlation of the best key profile, in [-1, 1]; below ~0.6 the
            music is not clearly tonal.
    """

    bpm: float
    key: str
    key_strength: float


def normalize_key(key: str) -> str:
    """Spell a key the way captions do: "a minor", "B- major" (music21), "Db major" -> "A minor", "Bb major", "C# major".

    Raises:
        ValueError: not "<tonic> major|minor".
    """
    m = _KEY_RE.match(key.strip())
    if not m:
        raise ValueError(f"key {key!r}: expected '<tonic> major' or '<tonic> minor', e.g. 'Eb minor'")
    name = m.group(1).upper() + m.group(2).replace("-", "b")
    return f"{_ALIASES.get(name, name)} {m.group(3)}"


def transpose_key(key: str, semitones: int) -> str:
    """The key `semitones` higher (negative: lower), e.g. ("A minor", 3) -> "C minor"."""
    tonic, mode = normalize_key(key).split()
    return f"{PITCH_NAMES[(PITCH_NAMES.index(tonic) + semitones) % 12]} {mode}"


def estimate_key(chroma: np.ndarray) -> tuple[str, float]:
    """Krumhansl-Schmuckler key of a pitch-class profile.

    Args:
        chroma: non-negative pitch-class weights, shape [12] (C first) or [12, T] (averaged over T).

    Returns:
        (key such as "E minor", correlation of the winning profile in [-1, 1]).

    Raises:
        ValueError: `chroma` does not have 12 rows, or is all zero.
    """
    c = np.asarray(chroma, dtype=np.float64)
    if c.ndim == 2:
        c = c.mean(axis=1)
    if c.shape != (12,):
        raise ValueError(f"estimate_key expects chroma of shape [12] or [12, T], got {np.shape(chroma)}")
    if not np.any(c > 0):
        raise ValueError("estimate_key: the chroma is all zero (silence has no key)")
    best, best_r = "C major", -2.0
    for tonic in range(12):
        for mode, profile in (("major", MAJOR_PROFILE), ("minor", MINOR_PROFILE)):
            r = float(np.corrcoef(c, np.roll(profile, tonic))[0, 1])
            if r > best_r:
                best, best_r = f"{PITCH_NAMES[tonic]} {mode}", r
    return best, best_r


def analyse_audio(x: np.ndarray, sr: int, excerpt_s: float = 60.0) -> AudioAnalysis:
    """Estimate the tempo and key of a track from an excerpt of its middle.

    Args:
        x: float waveform, shape [C, L] or [L], at `sr` Hz.
        sr: sample rate in Hz.
        excerpt_s: seconds analysed, centred on the middle of the track.

    Returns:
        The estimates.

    Raises:
        ValueError: the track is shorter than `MIN_ANALYSIS_S` (10 s) or silent.
    """
    import librosa

    from musiclora.audio import resample, to_mono

    y = to_mono(np.asarray(x, dtype=np.float32))
    if y.shape[-1] < MIN_ANALYSIS_S * sr:
        raise ValueError(f"analyse_audio: {y.shape[-1] / sr:.1f} s is too short (needs {MIN_ANALYSIS_S} s)")
    n = int(excerpt_s * sr)
    if y.shape[-1] > n:
        start = (y.shape[-1] - n) // 2
        y = y[start : start + n]
    y = resample(y, sr, ANALYSIS_SR)
    if not np.any(np.abs(y) > 1e-4):
        raise ValueError("analyse_audio: the excerpt is silent")
    onset = librosa.onset.onset_strength(y=y, sr=ANALYSIS_SR)
    bpm = float(librosa.feature.tempo(onset_envelope=onset, sr=ANALYSIS_SR, aggregate=np.median)[0])
    chroma = librosa.feature.chroma_stft(y=y, sr=ANALYSIS_SR, n_fft=4096, hop_length=2048, tuning=0.0)
    key, strength = estimate_key(chroma)
    return AudioAnalysis(bpm=float(round(bpm)), key=key, key_strength=round(strength, 3))


def format_bpm(bpm: float) -> str:
    """"120 BPM" (integers without decimals, else one decimal)."""
    return f"{bpm:.0f} BPM" if abs(bpm - round(bpm)) < 0.05 else f"{bpm:.1f} BPM"


def describe_music(
    key: str | None = None, metre: str | None = None, bpm: float | None = None, instruments: str | None = None
) -> str:
    """The analysis part of a caption, e.g. "string quartet, in A minor, 3/4 time, 72 BPM".

    Args:
        key: e.g. "A minor" (any spelling `normalize_key` accepts).
        metre: a time signature such as "3/4".
        bpm: tempo in beats per minute.
        instruments: an instrumentation phrase, e.g. "string quartet (violin, viola, cello)".

    Returns:
        The phrases that are known, joined by ", "; "" when none is.
    """
    parts = []
    if instruments:
        parts.append(instruments)
    if key:
        parts.append(f"in {normalize_key(key)}")
    if metre:
        parts.append(f"{metre} time")
    if bpm:
        parts.append(format_bpm(bpm))
    return ", ".join(parts)


def retune_caption(caption: str, key: str | None, bpm: float | None, semitones: int, rate: float) -> str:
    """Rewrite a caption's "in <key>" and "<bpm> BPM" phrases after a pitch shift / time stretch.

    Only phrases that spell the track's own `key` / `bpm` are changed, so free text is left alone.

    Args:
        caption: the original caption.
        key: the track's key before the shift (None: leave keys alone).
        bpm: the track's tempo before the stretch (None: leave tempi alone).
        semitones: the pitch shift applied.
        rate: the time-stretch rate applied (> 1 is faster).

    Returns:
        The caption with the new key and tempo.
    """
    out = caption
    if key and semitones:
        try:
            old = normalize_key(key)
        except ValueError:
            old = None
        if old:
            out = out.replace(f"in {old}", f"in {transpose_key(old, semitones)}")
    if bpm and rate != 1.0:
        out = out.replace(format_bpm(bpm), format_bpm(round(bpm * rate, 1)))
    return out
