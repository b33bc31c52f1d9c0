"""`musiclora demo`: the main job end to end on embedded defaults."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from musiclora.cli.errors import fail


def demo(
    workdir: Path = typer.Option(Path(".musiclora"), help="where the store, Ray state, corpus and outputs live"),
    max_tracks: int = typer.Option(24, help="tracks of the demo corpus to use, shared over its sources (0: all)"),
    steps: int = typer.Option(None, help="override optim.max_steps"),
    family: str = typer.Option("musicgen-melody", help="model family to demo: musicgen-melody, audioldm, audioldm2 or stable-audio-open"),
) -> None:
    """The main job end to end: store + Ray up, corpus, shards, `ray job submit` training, generation."""
    from musiclora.demo import run_demo

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        code = run_demo(workdir.resolve(), max_tracks=max_tracks or None, steps=steps, family=family)
    except (ValueError, RuntimeError) as exc:
        fail(exc)
    sys.exit(code)
