"""Real compositions rendered to audio: scores that ship inside `music21`, via MIDI and FluidSynth.

For each score of a `ScoreSet`:

1. parse it with music21 from the package's own corpus folder (``forceSource``, never its
   pickle cache);
2. orchestrate it: vocal scores (chorales, madrigals) get an ensemble chosen in rotation, so
   the set spans several timbres; the score's tempo mark is kept, or the set's default tempo
   written in;
3. analyse it: key (music21's Krumhansl-Schmuckler `analyze("key")`), metre (first time
   signature), tempo in BPM, instruments; these go into the caption;
4. write MIDI and append, on every track and channel, Sustain Off (CC 64 = 0) and All Notes Off
   (CC 123 = 0) at the track's end: some MIDI files otherwise never end in FluidSynth's renderer;
5. render with the ``fluidsynth`` command line and a General MIDI soundfont (Debian's
   ``fluid-soundfont-gm``), always under a time limit, then cut the audio to the score's length
   plus a short reverb tail, peak-normalise to -1 dBFS and store it as 16-bit FLAC.

Renders are cached in ``<cache_dir>/scores/<set>/`` (a FLAC plus a JSON row each), so a second
build is instant. Needs ``apt-get install fluidsynth fluid-soundfont-gm`` (scripts/setup.sh).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from musiclora.data.analysis import describe_music, normalize_key
from musiclora.data.metadata import build_caption

log = logging.getLogger(__name__)

RENDER_SR = 32_000
TAIL_S = 2.0
RENDER_VERSION = 1
SOUNDFONTS = (
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/sounds/sf2/default-GM.sf2",
    "/usr/share/sounds/sf3/default-GM.sf3",
)
# Ensemble name -> General MIDI programs (0-based) of its voices, top to bottom.
ENSEMBLES: dict[str, tuple[tuple[str, int], ...]] = {
    "string quartet": (("violin", 40), ("violin", 40), ("viola", 41), ("cello", 42)),
    "church organ": (("organ", 19),),
    "brass quartet": (("trumpet", 56), ("french horn", 60), ("trombone", 57), ("tuba", 58)),
    "woodwind quartet": (("flute", 73), ("oboe", 68), ("clarinet", 71), ("bassoon", 70)),
    "choir": (("choir", 52),),
    "string orchestra": (("strings", 48),),
    "piano": (("piano", 0),),
}
COMPOSERS = {
    "bach": "Johann Sebastian Bach", "haydn": "Joseph Haydn", "mozart": "Wolfgang Amadeus Mozart",
    "beethoven": "Ludwig van Beethoven", "schumann_robert": "Robert Schumann", "monteverdi": "Claudio Monteverdi",
    "joplin": "Scott Joplin", "schumann_clara": "Clara Schumann",
}  # fmt: skip


@dataclass(frozen=True)
class ScoreSet:
    """A selection of music21's bundled scores and how to render them.

    Attributes:
        name: set name, used as ``music21:<name>`` in `musiclora.data.corpus.CORPORA`.
        title: album-like name used in captions.
        style: the caption's leading style phrase, e.g. "Baroque four-part chorale".
        folders: music21 corpus folders to take scores from.
        pattern: file-name glob inside those folders (searched recursively).
        prefix: leads each title, e.g. "Chorale" -> "Chorale BWV 10.7".
        default_bpm: tempo written in when a score has no metronome mark (beats per minute).
        ensembles: ensembles assigned in rotation (`ENSEMBLES` keys).
        limit: at most this many scores (the first by path); None for all.
    """

    name: str
    title: str
    style: str
    folders: tuple[str, ...]
    pattern: str
    prefix: str
    default_bpm: float
    ensembles: tuple[str, ...]
    limit: int | None = None


_CHORALE_ENSEMBLES = ("string quartet", "church organ", "brass quartet", "woodwind quartet", "choir")
SCORE_SETS: dict[str, ScoreSet] = {
    s.name: s
    for s in (
        ScoreSet("bach-chorales", "Bach chorales (music21 corpus)", "Baroque four-part chorale", ("bach",),
                 "bwv*.mxl", "Chorale", 72.0, _CHORALE_ENSEMBLES),
        ScoreSet("bach-chorales-demo", "Bach chorales (music21 corpus)", "Baroque four-part chorale", ("bach",),
                 "bwv*.mxl", "Chorale", 72.0, _CHORALE_ENSEMBLES, limit=24),
        ScoreSet("string-quartets", "Classical string quartets (music21 corpus)", "Classical string quartet",
                 ("haydn", "mozart", "beethoven", "schumann_robert"), "*.mxl", "String Quartet", 100.0,
                 ("string quartet",)),
        ScoreSet("madrigals", "Monteverdi madrigals (music21 corpus)", "Renaissance five-voice madrigal",
                 ("monteverdi",), "madrigal*.mxl", "Madrigal", 80.0, ("choir", "string orchestra", "woodwind quartet")),
        ScoreSet("piano", "Piano pieces (music21 corpus)", "solo piano", ("joplin", "schumann_clara"), "*.mxl", "",
                 100.0, ("piano",)),
    )
}  # fmt: skip


class ScoreRenderError(RuntimeError):
    """A score could not be turned into audio; `path` names it, `reason` says why."""

    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot render score {self.path!r}: {reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


# --------------------------------------------------------------------------- tools


def find_soundfont() -> str:
    """The General MIDI soundfont to render with: $MUSICLORA_SOUNDFONT, else Debian's.

    Raises:
        RuntimeError: none found (names the apt package to install).
    """
    for candidate in (os.environ.get("MUSICLORA_SOUNDFONT"), *SOUNDFONTS):
        if candidate and Path(candidate).is_file():
            return str(Path(candidate).resolve())
    raise RuntimeError(
        f"no General MIDI soundfont found (looked at $MUSICLORA_SOUNDFONT and {list(SOUNDFONTS)}); "
        "install one: apt-get install fluid-soundfont-gm (scripts/setup.sh does)"
    )


def find_fluidsynth() -> str:
    """Path of the ``fluidsynth`` command.

    Raises:
        RuntimeError: not installed (names the apt package).
    """
    exe = shutil.which("fluidsynth")
    if exe is None:
        raise RuntimeError("`fluidsynth` not found; rendering scores needs it: apt-get install fluidsynth")
    return exe


def music21_corpus_dir() -> Path:
    """The folder of scores that ships inside the installed music21 package.

    Raises:
        RuntimeError: music21 is not installed.
    """
    try:
        import music21.corpus
    except ImportError as exc:
        raise RuntimeError("rendering scores needs the music21 package: pip install music21") from exc
    return Path(music21.corpus.__file__).parent


def list_scores(score_set: ScoreSet) -> list[Path]:
    """The set's score files (absolute), sorted by path, at most `limit`."""
    root = music21_corpus_dir()
    found = sorted({p for folder in score_set.folders for p in (root / folder).rglob(score_set.pattern) if p.is_file()})
    return found[: score_set.limit] if score_set.limit else found


# --------------------------------------------------------------------------- MIDI


def append_all_notes_off(smf: bytes) -> bytes:
    """Append Sustain Off and All Notes Off on all 16 channels at the end of every MIDI track.

    The events go just before each track's End Of Track meta event (at the same time), or at
    the end of a track that lacks one (which then gets one).

    Args:
        smf: a Standard MIDI File.

    Returns:
        The edited file, otherwise byte-identical.

    Raises:
        ValueError: not a Standard MIDI File (no MThd header, or a chunk that runs past the end).
    """
    if smf[:4] != b"MThd" or len(smf) < 14:
        raise ValueError("not a Standard MIDI File (no MThd header)")
    head_len = int.from_bytes(smf[4:8], "big")
    out = bytearray(smf[: 8 + head_len])
    events = [bytes([0xB0 | ch, cc, 0]) for ch in range(16) for cc in (64, 123)]
    tail = events[0] + b"".join(b"\x00" + e for e in events[1:]) + b"\x00\xff\x2f\x00"
    pos = 8 + head_len
    while pos < len(smf):
        kind, length = smf[pos : pos + 4], int.from_bytes(smf[pos + 4 : pos + 8], "big")
        body = smf[pos + 8 : pos + 8 + length]
        if len(body) != length:
            raise ValueError(f"MIDI chunk {kind!r} at byte {pos} runs past the end of the file")
        if kind == b"MTrk":
            # a track ends "<delta> FF 2F 00": our first event takes that delta, the rest come at +0
            body = body[:-3] + tail if body.endswith(b"\xff\x2f\x00") else body + b"\x00" + tail
        out += kind + len(body).to_bytes(4, "big") + body
        pos += 8 + length
    return bytes(out)


def render_midi(midi_path: str, wav_path: str, timeout_s: float, sample_rate: int = RENDER_SR) -> None:
    """Render MIDI to a stereo 16-bit WAV with FluidSynth, killed after `timeout_s` seconds.

    Raises:
        ScoreRenderError: fluidsynth failed or did not finish in time.
        RuntimeError: fluidsynth or the soundfont is missing.
    """
    cmd = [
        find_fluidsynth(), "-n", "-i", "-q", "-g", "0.5", "-r", str(sample_rate), "-o", "synth.cpu-cores=1",
        "-F", wav_path, "-T", "wav", "-O", "s16", find_soundfont(), midi_path,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ScoreRenderError(midi_path, f"FluidSynth did not finish within {timeout_s:.0f} s") from exc
    if proc.returncode != 0 or not Path(wav_path).is_file():
        raise ScoreRenderError(midi_path, f"FluidSynth failed (exit {proc.returncode}): {proc.stderr.strip()[-400:]}")


# --------------------------------------------------------------------------- one score


def _title(path: Path, score_set: ScoreSet) -> str:
    rel = path.relative_to(music21_corpus_dir()).with_suffix("")
    words = []
    for part in rel.parts[1:]:
        part = re.sub(r"^bwv", "BWV ", part)
        part = re.sub(r"^opus(\d+)", r"Op. \1", part)
        part = re.sub(r"no(\d+)$", r" No. \1", part)
        part = re.sub(r"n(\d+)$", r" No. \1", part)
        part = re.sub(r"^k(\d+)", r"K. \1", part)
        part = re.sub(r"^movement(\d+)", r"movement \1", part)
        part = re.sub(r"^madrigal\.", "", part)
        words.append(part.replace("_", " "))
    title = ", ".join(w for w in words if w)
    return f"{score_set.prefix} {title}".strip() if score_set.prefix else title[:1].upper() + title[1:]


def _orchestrate(score, ensemble: str) -> str:
    """Give every part an instrument of `ensemble`; returns "<ensemble> (<instruments>)"."""
    from music21 import instrument

    voices = ENSEMBLES[ensemble]
    names = []
    for i, part in enumerate(score.parts):
        name, program = voices[min(i, len(voices) - 1)]
        for old in list(part.recurse().getElementsByClass(instrument.Instrument)):
            old.activeSite.remove(old)
        inst = instrument.instrumentFromMidiProgram(program)
        inst.midiProgram = program
        part.insert(0, inst)
        names.append(name)
    return ensemble if len(set(names)) == 1 and len(voices) == 1 else f"{ensemble} ({', '.join(names)})"


def _without_repeats(score):
    """The score with its repeats written out, or (badly formed repeats) with them removed."""
    from music21 import bar, repeat, spanner

    try:
        return score.expandRepeats()
    except Exception:  # noqa: BLE001 - music21's ExpanderException and friends: play it through once
        for m in score.recurse().getElementsByClass("Measure"):
            if isinstance(m.leftBarline, bar.Repeat):
                m.leftBarline = None
            if isinstance(m.rightBarline, bar.Repeat):
                m.rightBarline = None
        for el in list(score.recurse().getElementsByClass((repeat.RepeatExpression, spanner.RepeatBracket))):
            el.activeSite.remove(el)
        for sp in list(score.spannerBundle.getByClass(spanner.RepeatBracket)):
            score.spannerBundle.remove(sp)
        return score


def _tempo(score, default_bpm: float) -> tuple[float, float]:
    """(bpm for the caption, seconds the score lasts), writing `default_bpm` in if it has no mark."""
    from music21 import tempo

    marks = [m for m in score.recurse().getElementsByClass(tempo.MetronomeMark) if m.number]
    if not marks:
        score.parts[0].insert(0, tempo.MetronomeMark(number=default_bpm))
    seconds = 0.0
    for start, end, mark in score.metronomeMarkBoundaries():
        seconds += (end - start) * 60.0 / mark.getQuarterBPM()
    bpm = float(marks[0].number) if marks else default_bpm
    return bpm, seconds


def render_score(path: Path, score_set: ScoreSet, index: int, out_dir: Path, max_render_s: float = 600.0) -> dict:
    """Parse, orchestrate, analyse, render and store one score; returns its metadata row.

    Args:
        path: a score file inside music21's corpus.
        score_set: the set it belongs to.
        index: its position in the set (picks the ensemble in rotation).
        out_dir: where ``<name>.flac`` and ``<name>.json`` go.
        max_render_s: hard cap on FluidSynth's wall time in seconds (the limit is otherwise
            60 s plus the score's own length).

    Returns:
        The metadata.jsonl row (path, caption, title, artist, album, genre, licence, licence_file,
        source_package, duration_s, sample_rate, channels, bpm, key, metre, instruments, score).

    Raises:
        ScoreRenderError: the score does not parse, is empty, or does not render.
    """
    import music21
    from music21 import converter

    stem = "_".join(path.relative_to(music21_corpus_dir()).with_suffix("").parts).replace(".", "-")
    flac, row_path = out_dir / f"{stem}.flac", out_dir / f"{stem}.json"
    if flac.is_file() and row_path.is_file():
        row = json.loads(row_path.read_text())
        if row.get("render_version") == RENDER_VERSION:
            return row
    try:
        score = converter.parse(path, forceSource=True, storePickle=False)
        if not hasattr(score, "parts") or not score.parts or score.highestTime <= 0:
            raise ScoreRenderError(str(path), "holds no parts or no notes")
        score = _without_repeats(score)
        ensemble = score_set.ensembles[index % len(score_set.ensembles)]
        instruments = _orchestrate(score, ensemble)
        bpm, seconds = _tempo(score, score_set.default_bpm)
        key = score.analyze("key")
        key_name = normalize_key(f"{key.tonic.name} {key.mode}")
        ts = score.recurse().getElementsByClass("TimeSignature").first()
        metre = ts.ratioString if ts is not None else None
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="musiclora-render-") as tmp:
            midi, wav = Path(tmp) / "score.mid", Path(tmp) / "score.wav"
            score.write("midi", fp=str(midi))
            midi.write_bytes(append_all_notes_off(midi.read_bytes()))
            render_midi(str(midi), str(wav), timeout_s=min(max_render_s, 60.0 + seconds))
            audio, sr = sf.read(str(wav), dtype="float32", always_2d=True)
    except ScoreRenderError:
        raise
    except Exception as exc:  # music21 raises many kinds on a bad score; one bad score must not stop a build
        raise ScoreRenderError(str(path), f"music21 cannot parse, analyse or write it ({exc!r})") from exc
    audio = audio[: int((seconds + TAIL_S) * sr)]
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak < 1e-4:
        raise ScoreRenderError(str(path), "rendered to silence")
    audio *= np.float32(10 ** (-1 / 20) / peak)
    tmp_flac = flac.with_suffix(".tmp.flac")
    sf.write(str(tmp_flac), audio, sr, subtype="PCM_16")
    os.replace(tmp_flac, flac)
    composer = COMPOSERS.get(path.relative_to(music21_corpus_dir()).parts[0])
    title = _title(path, score_set)
    caption = build_caption(score_set.style, title, composer, score_set.title)
    caption += "; " + describe_music(key_name, metre, bpm, instruments)
    row = {
        "path": str(flac.resolve()),
        "caption": caption,
        "title": title,
        "artist": composer,
        "album": score_set.title,
        "genre": score_set.style,
        "licence": "music21-corpus (public domain or licensed for use; see licence_file)",
        "licence_file": str(music21_corpus_dir() / "license.txt"),
        "source_package": f"music21={music21.__version__}",
        "duration_s": round(audio.shape[0] / sr, 3),
        "sample_rate": int(sr),
        "channels": int(audio.shape[1]),
        "bpm": bpm,
        "key": key_name,
        "metre": metre,
        "instruments": instruments,
        "score": str(path.relative_to(music21_corpus_dir())),
        "soundfont": find_soundfont(),
        "render_version": RENDER_VERSION,
    }
    row_path.write_text(json.dumps(row, ensure_ascii=False, indent=1))
    return row


def _render_job(args: tuple[str, str, int, str]) -> dict | tuple[str, str]:
    path, set_name, index, out_dir = args
    try:
        return render_score(Path(path), SCORE_SETS[set_name], index, Path(out_dir))
    except ScoreRenderError as exc:
        return (exc.path, exc.reason)
