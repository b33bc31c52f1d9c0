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
