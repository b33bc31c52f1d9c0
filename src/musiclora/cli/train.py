"""`musiclora train`: run a training config on this machine's Ray."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from musiclora.cli.errors import fail
from musiclora.cli.prepare import Overrides


def train(
    config: Path = typer.Option(..., exists=True, help="TrainConfig YAML"),
    overrides: list[str] = Overrides,
    dry_run: bool = typer.Option(False, "--dry-run", help="check the config (no weights, no workers) and exit"),
    offline: bool = typer.Option(False, "--offline", help="with --dry-run: do not touch object storage"),
) -> None:
    """Run a training config on this machine's Ray (local cluster started if none)."""
    from musiclora.config import ConfigError, TrainConfig, load_config
    from musiclora.train.trainer import PreflightError, run_training

    try:
        cfg = load_config(config, overrides, TrainConfig)
        if dry_run:
            from musiclora.train.dryrun import dry_run_train, emit

            raise typer.Exit(emit(dry_run_train(cfg, str(config), offline=offline)))
        summary = run_training(cfg)
    except (ConfigError, PreflightError) as exc:
        fail(exc)
    summary.pop("losses", None)
    print(json.dumps(summary))
