"""`musiclora tiny save`: the tiny random-weight presets of the real model classes, as folders."""

from __future__ import annotations

from pathlib import Path

import typer

from musiclora.cli.errors import fail

app = typer.Typer(help="Tiny random-weight presets of the real model classes.", no_args_is_help=True)


@app.command("save")
def save(
    out: Path = typer.Option(..., help="folder to write (save_pretrained layout)"),
    family: str = typer.Option("musicgen-melody"),
    seed: int = typer.Option(0),
) -> None:
    """Write the family's tiny preset as a normal save_pretrained folder others can load."""
    from musiclora.models.families import get_family

    try:
        print(get_family(family).save_tiny(str(out), seed=seed))
    except ValueError as exc:
        fail(exc)
