"""Evaluation inputs: the prompts JSONL and the reference set (audio folder, shards with sources or codes)."""

import json

import numpy as np
import pytest
import soundfile as sf

from musiclora.audio import load_audio, preprocess
from musiclora.data.shards import write_shard
from musiclora.eval.inputs import PromptSpec, check_prompts, load_prompts, load_reference

SR = 32000


def _write_tone(path, freq_hz: float, seconds: float, sr: int = 44100) -> None:
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32), sr)


def _jsonl(path, rows) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_load_prompts_defaults_and_relative_melody(tmp_path):
    (tmp_path / "tunes").mkdir()
    _write_tone(tmp_path / "tunes" / "m.wav", 262, 3.0, sr=22050)
    path = _jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"prompt": "calm piano"},
            "",
            {"prompt": "folk", "seed": 7, "melody": "tunes/m.wav", "melody_start_s": 1.0, "id": "folk-1"},
        ],
    )
    prompts = load_prompts(path, duration_s=1.5)
    assert [p.id for p in prompts] == ["p000", "folk-1"]
    assert [p.seed for p in prompts] == [0, 7]
    assert prompts[0].melody is None
    assert prompts[1].melody_sample_rate == 22050 and prompts[1].melody.shape == (round(1.5 * 22050),)
    assert prompts[1].melody_source.endswith("tunes/m.wav@1s")


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([{"prompt": "a"}, {"prompt": "b", "temperature": 1}], r"line 2: temperature: Extra inputs"),
        ([{"prompt": "a"}, "{not json"], r"line 2: not valid JSON"),
        ([{"prompt": "a"}, {"prompt": ""}], r"line 2: prompt: String should have at least 1"),
        ([{"prompt": "a", "id": "x"}, {"prompt": "b", "id": "x"}], "prompt id 'x' appears twice"),
        ([{"prompt": "only one"}], "KAD and FAD need at least 2"),
        ([{"prompt": "a"}, {"prompt": "b", "id": "../../etc"}], r"line 2: id: String should match"),
    ],
)
def test_load_prompts_errors_name_the_line(tmp_path, rows, match):
    with pytest.raises(ValueError, match=match):
        load_prompts(_jsonl(tmp_path / "p.jsonl", rows))


def test_load_prompts_missing_melody_file(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b", "melody": "gone.wav"}])
    with pytest.raises(FileNotFoundError):
        load_prompts(path)


def test_check_prompts_accepts_two_distinct():
    check_prompts([PromptSpec("a", "x"), PromptSpec("b", "y")])


def test_audio_folder_reference_round_robin_skips_silence_and_bad_files(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    _write_tone(ref / "long.wav", 220, 5.0)
    _write_tone(ref / "short.wav", 330, 2.2)
    sf.write(ref / "silent.wav", np.zeros(44100, np.float32), 44100)
    (ref / "broken.wav").write_bytes(b"RIFF not really")
    out = load_reference(ref, SR, clip_s=1.0, max_clips=4)
    assert len(out.wavs) == 4 and all(w.shape == (SR,) and w.dtype == np.float32 for w in out.wavs)
    # round robin: long, short, long, short (the silent file gives no clip, the broken one is noted)
    assert [lab.split("@")[0] for lab in out.labels] == ["long.wav", "short.wav", "long.wav", "short.wav"]
    assert any("broken.wav" in s for s in out.notes["skipped"])


def test_reference_needs_two_clips(tmp_path):
    _write_tone(tmp_path / "one.wav", 220, 1.2)
    with pytest.raises(ValueError, match="1 usable clip"):
        load_reference(tmp_path / "one.wav", SR, clip_s=1.0)
    with pytest.raises(FileNotFoundError, match="neither a shards folder"):
        load_reference(tmp_path / "nothing", SR, clip_s=1.0)


def _shards(tmp_path, source: str, codes: np.ndarray) -> str:
    """A shards folder of 3 samples (2 s segments of `source`) as `prepare` writes them, val split only."""
    import io

    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    out = tmp_path / "shards"
    samples = [
        {
            "__key__": f"t0_{i}",
            "codes.npy": npy(codes),
            "json": {"caption": "x", "source": source, "start_s": 2.0 * i, "duration_s": 2.0},
        }
        for i in range(3)
    ]
    info = write_shard(str(out / "val-00000-000.tar"), samples)
    manifest = {
        "num_samples": {"train": 0, "val": 3},
        "shards": [{"name": "val-00000-000.tar", "split": "val", "num_samples": info["num_samples"]}],
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return str(out)


def test_shard_reference_rereads_the_source_segments(tmp_path):
    _write_tone(tmp_path / "track.wav", 440, 7.0)
    shards = _shards(tmp_path, str(tmp_path / "track.wav"), np.zeros((4, 100), np.int16))
    out = load_reference(shards, SR, clip_s=1.5)
    wav, sr = load_audio(str(tmp_path / "track.wav"))
    full = preprocess(wav, sr, SR)
    assert out.origin.endswith("(val split)") and len(out.wavs) == 3
    for i, clip in enumerate(out.wavs):
        np.testing.assert_array_equal(clip, full[round(2.0 * i * SR) : round(2.0 * i * SR) + round(1.5 * SR)])


def test_shard_reference_decodes_codes_when_the_source_is_gone(tmp_path):
    codes = np.arange(400, dtype=np.int16).reshape(4, 100)
    shards = _shards(tmp_path, str(tmp_path / "moved-away.wav"), codes)
    seen = []

    def decode(c):
        seen.append(c.copy())
        return np.full(3 * SR, 0.1, np.float32)

    out = load_reference(shards, SR, clip_s=1.0, decode_codes=decode)
    assert out.notes["decoded_from_codes"] == 3 and len(seen) == 3
    np.testing.assert_array_equal(seen[0], codes)
    assert all(w.shape == (SR,) for w in out.wavs)
    with pytest.raises(ValueError, match="cannot read source"):
        load_reference(shards, SR, clip_s=1.0)
