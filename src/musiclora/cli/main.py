"""The `musiclora` root command: mounts one module per command group.

Every command validates its inputs before doing any work; errors are printed as one clear
message (no traceback) with exit code 2 (`cli/errors.py`).
"""

from __future__ import annotations

import typer

from musiclora.cli.adapters import app as adapters_app
from musiclora.cli.corpus import app as corpus_app
from musiclora.cli.demo import demo
from musiclora.cli.evaluate import adaptation_table, evaluate
from musiclora.cli.generate import generate
from musiclora.cli.k8s import app as k8s_app
from musiclora.cli.prepare import prepare
from musiclora.cli.store import app as store_app
from musiclora.cli.tiny import app as tiny_app
from musiclora.cli.train import train
from musiclora.cli.tune import app as tune_app

app = typer.Typer(help="LoRA adaptation of text-to-music models at cluster scale.", no_args_is_help=True)
app.add_typer(tune_app, name="tune")
app.add_typer(store_app, name="store")
app.add_typer(k8s_app, name="k8s")
app.add_typer(adapters_app, name="adapters")
app.add_typer(corpus_app, name="corpus")
app.add_typer(tiny_app, name="tiny")
app.command()(prepare)
app.command()(train)
app.command()(generate)
app.command()(demo)
app.command()(evaluate)
app.command("adaptation-table")(adaptation_table)

if __name__ == "__main__":
    app()
