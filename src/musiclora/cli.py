"""`musiclora` command line: store, corpus, tiny, prepare, train, generate, demo.

Every command validates its inputs before doing any work; errors are printed as one clear
message (no traceback) with exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer
from rich.console import Console

from musiclora.adapters_cli import app as adapters_app
from musiclora.eval_cli import app as eval_app
from musiclora.k8s_cli import app as k8s_app
from musiclora.store_cli import app as store_app

app = typer.Typer(help="LoRA adaptation of text-to-music models at cluster scale.", no_args_is_help=True)
corpus_app = typer.Typer(help="Real music to train on.", no_args_is_help=True)
tiny_app = typer.Typer(help="Tiny random-weight presets of the real model classes.", no_args_is_help=True)
tune_app = typer.Typer(help="Ray Tune search over LoRA hyper-parameters.", no_args_is_help=True)
app.add_typer(tune_app, name="tune")
app.add_typer(store_app, name="store")
app.add_typer(k8s_app, name="k8s")
app.add_typer(adapters_app, name="adapters")
app.add_typer(eval_app)  # `musiclora evaluate`, `musiclora adaptation-table`
app.add_typer(corpus_app, name="corpus")
app.add_typer(tiny_app, name="tiny")
console = Console(stderr=True)

Overrides = typer.Argument(None, help="dotted key=value overrides, e.g. adapter.r=16")


def _fail(exc: Exception) -> None:
    console.print(f"[red]error:[/red] {type(exc).__name__}: ", end="")
    console.print(str(exc), markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@corpus_app.command("build")
def corpus_build(
    name: str = typer.Option("demo", help="corpus name (see musiclora.data.corpus.CORPORA)"),
    cache_dir: Path = typer.Option(Path(".musiclora/cache/corpus"), help="download/extract folder"),
    max_tracks: int = typer.Option(None, help="keep at most this many tracks"),
) -> None:
    """Fetch real music from Debian's music packages (apt-get download + dpkg -x) and write metadata.jsonl."""
    from musiclora.data.corpus import build_corpus, corpus_info_to_dict

    try:
        info = build_corpus(name, cache_dir=cache_dir, max_tracks=max_tracks)
    except (ValueError, OSError, RuntimeError) as exc:
        _fail(exc)
    print(json.dumps(corpus_info_to_dict(info), default=str))


@tiny_app.command("save")
def tiny_save(
    out: Path = typer.Option(..., help="folder to write (save_pretrained layout)"),
    family: str = typer.Option("musicgen-melody"),
    seed: int = typer.Option(0),
) -> None:
    """Write the family's tiny preset as a normal save_pretrained folder others can load."""
    from musiclora.models.registry import get_family

    try:
        print(get_family(family).save_tiny(str(out), seed=seed))
    except ValueError as exc:
        _fail(exc)


@app.command()
def prepare(
    config: Path = typer.Option(..., exists=True, help="PrepareConfig YAML"),
    overrides: list[str] = Overrides,
    tracks_per_task: int = typer.Option(4, help="tracks per Ray Data batch (one shard group each)"),
    concurrency: int = typer.Option(1, help="encoder actors"),
) -> None:
    """Audio + metadata -> family features -> WebDataset shards + manifest.json (Ray Data)."""
    from musiclora.config import ConfigError, PrepareConfig, load_config
    from musiclora.data.prepare import prepare as run_prepare

    try:
        cfg = load_config(config, overrides, PrepareConfig)
        manifest = run_prepare(cfg, tracks_per_task=tracks_per_task, concurrency=concurrency)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        _fail(exc)
    keep = ("family", "num_tracks", "num_skipped", "num_samples", "audio_seconds", "prepare_wall_s")
    print(json.dumps({k: manifest[k] for k in keep}))


@app.command()
def train(
    config: Path = typer.Option(..., exists=True, help="TrainConfig YAML"),
    overrides: list[str] = Overrides,
) -> None:
    """Run a training config on this machine's Ray (local cluster started if none)."""
    from musiclora.config import ConfigError, TrainConfig, load_config
    from musiclora.train.trainer import PreflightError, run_training

    try:
        cfg = load_config(config, overrides, TrainConfig)
        summary = run_training(cfg)
    except (ConfigError, PreflightError) as exc:
        _fail(exc)
    summary.pop("losses", None)
    print(json.dumps(summary))


@tune_app.command("run")
def tune_run(
    config: Path = typer.Option(..., exists=True, help="TuneConfig YAML"),
    overrides: list[str] = Overrides,
) -> None:
    """Run (or resume) a search on this machine's Ray; the winner is published to the registry."""
    from musiclora.config import ConfigError
    from musiclora.train.trainer import PreflightError
    from musiclora.tune import load_tune_config, run_tune
    from musiclora.tune_report import save_summary

    try:
        tune_cfg, base = load_tune_config(config, overrides)
        summary = {"name": tune_cfg.name, **run_tune(tune_cfg, base)}
    except (ConfigError, PreflightError) as exc:
        _fail(exc)
    save_summary(tune_cfg.storage_path, tune_cfg.name, summary)
    print(json.dumps({k: summary[k] for k in ("name", "best", "registry")}, default=str))


@tune_app.command("report")
def tune_report(
    name: str = typer.Option(..., help="Tune experiment name"),
    storage_path: str = typer.Option("s3://musiclora/tune", help="Tune storage_path"),
    out: Path = typer.Option(Path("tune_report"), help="folder for tune_report.md and PNG plots"),
    metric: str = typer.Option("loss"),
) -> None:
    """PNG plots of the metric against r, lora_alpha, lora_dropout, lr, and a Markdown table of the trials."""
    from musiclora.tune_report import load_summary, write_report

    try:
        paths = write_report(load_summary(storage_path, name), str(out), metric)
    except FileNotFoundError as exc:
        _fail(exc)
    print(json.dumps(paths))


@app.command()
def generate(
    prompt: str = typer.Option(..., help="text prompt"),
    out: Path = typer.Option(Path("generated.wav"), help="WAV to write (a spectrogram PNG goes beside it)"),
    adapter: str = typer.Option(None, help="adapter folder URL/path (peft format)"),
    base: str = typer.Option(None, help="base model (hub id, folder, 'tiny'); default: the adapter card's"),
    family: str = typer.Option(None, help="model family; default: the adapter card's"),
    duration_s: float = typer.Option(2.0, min=0.1, max=60.0),
    guidance_scale: float = typer.Option(3.0, min=0.0),
    seed: int = typer.Option(0),
    melody: Path = typer.Option(None, exists=True, help="audio whose melody conditions the output"),
    steps: int = typer.Option(None, min=1, help="denoising steps (diffusion families: AudioLDM)"),
    reference: Path = typer.Option(None, exists=True,
                                   help="AudioLDM: audio whose CLAP embedding conditions instead of the prompt"),
) -> None:
    """Generate audio with a base model and an optional LoRA adapter."""
    from musiclora.data.audio import AudioDecodeError
    from musiclora.generate import generate as run_generate

    try:
        info = run_generate(prompt, str(out), family, base, adapter, duration_s, guidance_scale, seed,
                            str(melody) if melody else None, steps=steps,
                            reference=str(reference) if reference else None)
    except (ValueError, FileNotFoundError, AudioDecodeError) as exc:
        _fail(exc)
    print(json.dumps(info))


@app.command()
def demo(
    workdir: Path = typer.Option(Path(".musiclora"), help="where the store, Ray state, corpus and outputs live"),
    max_tracks: int = typer.Option(24, help="tracks of the demo corpus to use, shared over its sources (0: all)"),
    steps: int = typer.Option(None, help="override optim.max_steps"),
    family: str = typer.Option("musicgen-melody", help="model family to demo: musicgen-melody or audioldm"),
) -> None:
    """The main job end to end: store + Ray up, corpus, shards, `ray job submit` training, generation."""
    from musiclora.demo import run_demo

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        code = run_demo(workdir.resolve(), max_tracks=max_tracks or None, steps=steps, family=family)
    except (ValueError, RuntimeError) as exc:
        _fail(exc)
    sys.exit(code)


if __name__ == "__main__":
    app()
