"""`evaluate` and `adaptation-table` commands: help, clear errors, a full run on the tiny model."""

import json

import numpy as np
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
