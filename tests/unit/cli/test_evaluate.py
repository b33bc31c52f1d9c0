"""`evaluate` and `adaptation-table` commands: help, clear errors, a full run on the tiny model."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from musiclora.adapters import apply_lora, save_adapter
from musiclora.cli import app
from musiclora.config import AdapterConfig
from musiclora.models.families import get_family

runner = CliRunner()


def test_help_lists_both_commands_and_their_options():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "evaluate" in result.output and "adaptation-table" in result.output
    result = runner.invoke(app, ["evaluate", "--help"])
    assert result.exit_code == 0
    for option in ("--adapter", "--prompts", "--reference", "--clap", "--embedders"):
        assert option in result.output


def test_missing_adapter_is_a_one_line_error(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--adapter",
            str(tmp_path / "nope"),
            "--prompts",
            str(tmp_path / "p.jsonl"),
            "--reference",
            str(tmp_path),
            "--base",
            "tiny",
        ],
    )
    assert result.exit_code == 2
    assert "no adapter folder at" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("option, value, match", [("--dtype", "float8", "dtype"),
                                                  ("--device", "tpu", "device 'tpu': expected cpu, cuda")])
def test_bad_device_or_dtype_is_a_one_line_error(tmp_path, tiny_musicgen_dir, option, value, match):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    result = runner.invoke(app, ["evaluate", "--adapter", str(tmp_path), "--prompts", str(tmp_path / "p.jsonl"),
                                 "--reference", str(tmp_path), "--base", str(tiny_musicgen_dir), option, value])
    assert result.exit_code == 2 and match in result.output and "Traceback" not in result.output


def test_evaluate_command_writes_the_report(tiny_musicgen_dir, tmp_path):
    family = get_family("musicgen-melody")
    model = apply_lora(family.load(tiny_musicgen_dir).model, family, AdapterConfig())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    adapter = save_adapter(
        model, str(tmp_path / "adapter"), card={"family": family.name, "base_model": tiny_musicgen_dir}
    )
    (tmp_path / "ref").mkdir()
    t = np.arange(2 * 32000) / 32000
    for i, f in enumerate((220, 440)):
        sf.write(tmp_path / "ref" / f"r{i}.wav", 0.3 * np.sin(2 * np.pi * f * t), 32000)
    (tmp_path / "p.jsonl").write_text('{"prompt": "calm"}\n{"prompt": "loud", "seed": 5}\n')
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--adapter",
            adapter,
            "--prompts",
            str(tmp_path / "p.jsonl"),
            "--reference",
            str(tmp_path / "ref"),
            "--out",
            str(tmp_path / "out"),
            "--embedders",
            "clap,mel-stats",
            "--duration-s",
            "1",
            "--no-music",
        ],
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(printed) == {"files", "embedders", "left_out", "base", "adapter"}
    # no --clap: no CLAP score, no CLAP KAD/FAD, the reason printed once; mel-stats still runs
    assert "kad_mel_stats" in printed["adapter"] and printed["adapter"]["kad"] == printed["adapter"]["kad_mel_stats"]
    assert "clap_score" not in printed["adapter"] and "kad_clap" not in printed["adapter"]
    assert set(printed["left_out"]) == {"clap_score", "kad_clap", "fad_clap"}
    assert result.stderr.count("no CLAP checkpoint given") == 1
    assert printed["embedders"] == {"mel_stats": "mel-stats (no model: log-mel mean and std)"}
    assert (tmp_path / "out" / "report.html").exists() and (
        tmp_path / "out" / "audio" / "p001_adapter.wav"
    ).exists()
    bad = runner.invoke(
        app,
        [
            "evaluate",
            "--adapter",
            adapter,
            "--prompts",
            str(tmp_path / "p.jsonl"),
            "--reference",
            str(tmp_path / "ref"),
            "--embedders",
            "clap,vggish",
            "--duration-s",
            "1",
        ],
    )
    assert bad.exit_code == 2 and "unknown embedder 'vggish'" in bad.output


@pytest.mark.parametrize("family, music", [("audioldm2", False), ("stable-audio-open", True)])
def test_evaluate_runs_the_diffusion_families(family, music, request, tmp_path):
    """`musiclora evaluate` on an adapter of AudioLDM2 / Stable Audio Open (tiny bases, explicit embedders):
    base and adapter clips at the family's rate and channels, the adapter's differ; for Stable Audio Open the study-002
    metrics in the report are those of the family's stereo 44.1 kHz output [2, L]."""
    from musiclora.adapters import load_for_inference
    from musiclora.eval.scoring import music_scores
    from tests.serve_helpers import make_random_adapter

    base = request.getfixturevalue({"audioldm2": "tiny_audioldm2_dir", "stable-audio-open": "tiny_stable_audio_dir"}[family])
    adapter = make_random_adapter(base, str(tmp_path / "adapter"), 1, family=family)
    sr = get_family(family).sample_rate
    (tmp_path / "ref").mkdir()
    t = np.arange(2 * sr) / sr
    for i, f in enumerate((220, 440)):
        sf.write(tmp_path / "ref" / f"r{i}.wav", 0.3 * np.sin(2 * np.pi * f * t), sr)
    (tmp_path / "p.jsonl").write_text('{"prompt": "calm"}\n{"prompt": "loud", "seed": 5}\n')
    result = runner.invoke(app, ["evaluate", "--adapter", adapter, "--prompts", str(tmp_path / "p.jsonl"),
                                 "--reference", str(tmp_path / "ref"), "--out", str(tmp_path / "out"),
                                 "--embedders", "mel-stats", "--duration-s", "1",
                                 "--music" if music else "--no-music"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["info"]["family"] == family and "kad_mel_stats" in report["metrics"]["adapter"]
    clips = {k: sf.read(tmp_path / "out" / "audio" / f"p000_{k}.wav", dtype="float32") for k in ("base", "adapter")}
    assert all(rate == sr and len(wav) == sr for wav, rate in clips.values())
    # the report's clips keep the family's channels (Stable Audio Open: stereo WAVs)
    channels = get_family(family).channels
    assert {sf.info(tmp_path / "out" / "audio" / f"p000_{k}.wav").channels for k in clips} == {channels}
    assert sf.info(tmp_path / "out" / "audio" / "reference_0.wav").channels == 1
    assert np.abs(clips["adapter"][0] - clips["base"][0]).max() > 1e-3
    if music:
        _, loaded = load_for_inference(adapter, None, None)
        from musiclora.models.stable_audio import sample_stable_audio

        stereo, rate = sample_stable_audio(loaded.model, loaded.tokenizer, "calm", 1.0, 3.0, seed=0)
        assert stereo.shape == (2, sr) and rate == sr
        values, _ = music_scores(stereo, sr)  # harmonic accuracy, melodic complexity, rhythmic inconsistency
        assert set(values) == {"harmonic_accuracy", "melodic_complexity", "rhythmic_inconsistency"}
        scored = report["prompts"][0]["adapter"]
        assert {k: scored[k] for k in values} == pytest.approx(values)
