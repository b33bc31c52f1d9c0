"""`musiclora store up|down|status|env`: the embedded S3 store (SeaweedFS) for the demo.

`up` prints `export AWS_...=...` lines on stdout (the human summary goes to stderr), so
`eval "$(musiclora store up)"` starts the store and points this shell at it.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from musiclora.cli.errors import console as _err
from musiclora.storage import DEFAULT_DATA_DIR, DEFAULT_S3_PORT, StorageError
from musiclora.store import EmbeddedStore

app = typer.Typer(help="Run the embedded S3 object store (SeaweedFS) on loopback.", no_args_is_help=True)

DataDir = typer.Option(DEFAULT_DATA_DIR, "--data-dir", help="Folder for the store's data and state file.")


def _exports(store: EmbeddedStore) -> str:
    return "\n".join(f"export {k}={v}" for k, v in store.env().items())


@app.command()
def up(
    data_dir: Path = DataDir,
    port: int = typer.Option(
        DEFAULT_S3_PORT, "--port", help="S3 port P; weed also uses P+1..P+4 and +10000."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (keep it loopback)."),
    timeout_s: float = typer.Option(60.0, "--timeout", help="Seconds to wait for S3 to answer."),
) -> None:
    """Start the store (or reuse the running one) and print the env vars to export."""
    store = EmbeddedStore(data_dir, s3_port=port, host=host)
    try:
        store.start(timeout_s=timeout_s)
    except StorageError as exc:
        _err.print("[red]store up failed:[/red]", end=" ")
        _err.print(str(exc), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from exc
    state = store.status() or {}
    _err.print(
        f"[green]S3 store running[/green] at {store.endpoint_url} (pid {state.get('pid')}, "
        f"data {store.data_dir}, bucket s3://{store.bucket}); stop with `musiclora store down`",
        highlight=False,
        soft_wrap=True,
    )
    typer.echo(_exports(store))


@app.command()
def down(data_dir: Path = DataDir) -> None:
    """Stop the store recorded in DATA_DIR (no-op if none runs)."""
    store = EmbeddedStore(data_dir)
    state = store.status()
    if store.stop():
        _err.print(f"stopped the S3 store (pid {state['pid'] if state else '?'}) in {store.data_dir}")
    else:
        _err.print(f"no S3 store running in {store.data_dir}")


@app.command()
def status(data_dir: Path = DataDir) -> None:
    """Print the store's state as JSON; exit code 1 if it is not running."""
    state = EmbeddedStore(data_dir).status()
    if state is None:
        _err.print(f"no S3 store running in {Path(data_dir).resolve()}")
        raise typer.Exit(1)
    typer.echo(json.dumps(state, indent=2))


@app.command()
def env(data_dir: Path = DataDir) -> None:
    """Print `export` lines for the running store (for `eval`); exit code 1 if none runs."""
    store = EmbeddedStore.attach(data_dir)
    if store is None:
        _err.print(f"no S3 store running in {Path(data_dir).resolve()}")
        raise typer.Exit(1)
    typer.echo(_exports(store))


if __name__ == "__main__":  # `python -m musiclora.cli.<group>` runs the group alone
    app()
