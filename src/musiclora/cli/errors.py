"""The one way a `musiclora` command reports a failure: a clear line on stderr, exit code 2."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

console = Console(stderr=True)
"""stderr console shared by the command modules (stdout carries JSON results only)."""


def fail(exc: BaseException) -> NoReturn:
    """Print `error: <Type>: <message>` on stderr (message verbatim, no markup) and exit with code 2.

    Raises:
        typer.Exit: always, with code 2.
    """
    console.print(f"[red]error:[/red] {type(exc).__name__}: ", end="")
    console.print(str(exc), markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2) from None
