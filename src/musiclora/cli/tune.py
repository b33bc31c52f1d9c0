"""`musiclora tune run|report`: Ray Tune search over the LoRA hyper-parameters, and its report."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from musiclora.cli.errors import fail
from musiclora.cli.prepare import Overrides

app = typer.Typer(help="Ray Tune search over LoRA hyper-parameters.", no_args_is_help=True)


@app.command("run")
def run(
    config: Path = typer.Option(..., exists=True, help="TuneConfig YAML"),
    overrides: list[str] = Overrides,
    dry_run: bool = typer.Option(False, "--dry-run", help="check the config and its train config, then exit"),
    offline: bool = typer.Option(False, "--offline", help="with --dry-run: do not touch object storage"),
) -> None:
    """Run (or resume) a search on this machine's Ray; the winner is published to the registry."""
    from musiclora.config import ConfigError
    from musiclora.train.trainer import PreflightError
    from musiclora.tune.report import save_summary
    from musiclora.tune.search import load_tune_config, run_tune

    try:
        tune_cfg, base = load_tune_config(config, overrides)
        if dry_run:
            from musiclora.train.dryrun import dry_run_tune, emit

            raise typer.Exit(emit(dry_run_tune(tune_cfg, base, str(config), offline=offline)))
        summary = {"name": tune_cfg.name, **run_tune(tune_cfg, base)}
    except (ConfigError, PreflightError) as exc:
        fail(exc)
    save_summary(tune_cfg.storage_path, tune_cfg.name, summary)
    print(json.dumps({k: summary[k] for k in ("name", "best", "registry")}, default=str))


@app.command("report")
def report(
    name: str = typer.Option(..., help="Tune experiment name"),
    storage_path: str = typer.Option("s3://musiclora/tune", help="Tune storage_path"),
    out: Path = typer.Option(Path("tune_report"), help="folder for tune_report.md and PNG plots"),
    metric: str | None = typer.Option(None, help="objective to sort and colour by (default: the search's)"),
) -> None:
    """PNG plots of val_loss (and KAD, when the search scored audio) against every searched key (r, lora_alpha,
    lora_dropout, lr, preset), a parallel-coordinates view of all trials, and a Markdown table of the trials."""
    from musiclora.tune.report import load_summary, write_report

    try:
        paths = write_report(load_summary(storage_path, name), str(out), metric)
    except FileNotFoundError as exc:
        fail(exc)
    print(json.dumps(paths))
