"""`musiclora prepare`: audio + metadata -> family features -> WebDataset shards (Ray Data)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from musiclora.cli.errors import console, fail

Overrides = typer.Argument(None, help="dotted key=value overrides, e.g. adapter.r=16")


def prepare(
    config: Path = typer.Option(..., exists=True, help="PrepareConfig YAML"),
    overrides: list[str] = Overrides,
    tracks_per_task: int = typer.Option(4, help="tracks per Ray Data batch (one shard group each)"),
    concurrency: int = typer.Option(None, help="encoder actors (default: the config's encoder_actors)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="check the config (no encoders, no workers) and exit"),
    offline: bool = typer.Option(False, "--offline", help="with --dry-run: do not touch object storage"),
) -> None:
    """Audio + metadata -> family features -> WebDataset shards + manifest.json (Ray Data)."""
    from musiclora.config import ConfigError, PrepareConfig, load_config
    from musiclora.data.prepare import prepare as run_prepare

    try:
        cfg = load_config(config, overrides, PrepareConfig)
        if dry_run:
            from musiclora.train.dryrun import dry_run_prepare, emit

            raise typer.Exit(emit(dry_run_prepare(cfg, str(config), offline=offline)))
        manifest = run_prepare(cfg, tracks_per_task=tracks_per_task, concurrency=concurrency)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        fail(exc)
    print_skipped(manifest.get("skipped", []))
    keep = ("family", "num_tracks", "num_skipped", "num_samples", "audio_seconds", "prepare_wall_s")
    print(json.dumps({k: manifest[k] for k in keep}))


def print_skipped(skipped: list[dict]) -> None:
    """One stderr line per skipped input: its path and the reason (as recorded in manifest.json)."""
    for item in skipped:
        console.print(f"skipped {item.get('path', '?')}: {item.get('reason', '?')}", markup=False,
                      highlight=False, soft_wrap=True)
