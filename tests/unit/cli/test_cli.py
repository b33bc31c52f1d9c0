"""Every `musiclora` command answers --help, and bad input exits 2 with a clear message."""

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from musiclora.cli import app

BIN = str(Path(sys.executable).parent / "musiclora")


def _commands(typer_app, prefix=()):
    import typer.main

    group = typer.main.get_command(typer_app)
    out = []

    def walk(cmd, path):
        out.append(path)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, (*path, name))

    walk(group, prefix)
    return out


@pytest.mark.parametrize("path", _commands(app), ids=lambda p: " ".join(p) or "musiclora")
def test_help(path):
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_bad_config_exits_2_naming_the_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {shards_url: s3://b/s}\nrun: {storage_path: s3://b/r, adapters_url: s3://b/a}\n")
    proc = subprocess.run([BIN, "train", "--config", str(cfg), "adapter.lora_dropout=1.5"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "adapter.lora_dropout" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("family, channels", [("stable-audio-open", 2), ("musicgen-melody", 1)])
def test_generate_writes_the_family_channels(family, channels, tmp_path):
    """`musiclora generate` on a tiny base: Stable Audio Open's stereo comes out as a 2-channel 44.1 kHz WAV
    whose channels differ (not a downmix), a mono family's as 1 channel; the printed JSON says so."""
    import json

    import numpy as np
    import soundfile as sf

    from musiclora.models.families import get_family

    out = tmp_path / "clip.wav"
    result = CliRunner().invoke(app, ["generate", "--family", family, "--base", "tiny", "--prompt", "calm piano",
                                      "--duration-s", "0.5", "--steps", "2", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout.strip().splitlines()[-1])
    audio, sr = sf.read(out, dtype="float32", always_2d=True)  # [L, C]
    rate = get_family(family).sample_rate
    assert sr == info["sample_rate"] == rate and audio.shape == (round(0.5 * rate), channels)
    assert info["channels"] == channels and info["duration_s"] == pytest.approx(0.5, abs=1 / rate)
    if channels == 2:
        assert np.abs(audio[:, 0] - audio[:, 1]).max() > 1e-3
