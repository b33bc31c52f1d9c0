"""`musiclora adapters list|show|publish|promote`: the adapter registry from the command line.

Every command prints JSON on stdout; errors are one clear line on stderr with exit code 2.
The registry root comes from `--registry`, else `$MUSICLORA_REGISTRY_URL`, else
`s3://musiclora/registry` (S3 endpoint and keys from the standard AWS variables).
"""

from __future__ import annotations

import json
from typing import Any

import typer

from musiclora.adapter_registry import Registry, RegistryError, default_registry_url
from musiclora.cli.errors import fail
from musiclora.storage import StorageError

app = typer.Typer(help="The adapter registry: publish, list, show and promote LoRA adapters.",
                  no_args_is_help=True)

RegistryOpt = typer.Option(None, "--registry", help="registry root URL (default: $MUSICLORA_REGISTRY_URL "
                                                    "or s3://musiclora/registry)")
FamilyOpt = typer.Option(None, "--family", help="model family (default: found from the name / the card)")


def _registry(url: str | None) -> Registry:
    return Registry(url or default_registry_url())


def _run(fn, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except (RegistryError, StorageError, ValueError, FileNotFoundError) as exc:
        fail(exc)


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


@app.command("list")
def list_(registry: str = RegistryOpt, family: str = FamilyOpt) -> None:
    """List adapters: family, name, complete versions, the `latest` pointer."""
    _print(_run(_registry(registry).list, family))


@app.command()
def show(
    ref: str = typer.Argument(..., help="NAME[@VERSION]; no version means latest"),
    registry: str = RegistryOpt,
    family: str = FamilyOpt,
) -> None:
    """Show one version: its URL, card, files (with sha256) and the latest pointer."""
    _print(_run(_registry(registry).show, ref, family))


@app.command()
def publish(
    source: str = typer.Argument(..., help="adapter folder URL or path (peft files + card.json)"),
    name: str = typer.Option(..., "--name", help="adapter name: letters, digits, '.', '_', '-'"),
    version: int = typer.Option(None, "--version", min=1, help="version number (default: the next one)"),
    promote: bool = typer.Option(False, "--promote", help="also move `latest` to the new version"),
    registry: str = RegistryOpt,
    family: str = FamilyOpt,
) -> None:
    """Publish an adapter folder as a new immutable version (written fully before it is visible)."""
    v = _run(_registry(registry).publish, source, name, family=family, version=version, promote=promote)
    _print({"family": v.family, "name": v.name, "version": v.version, "ref": v.ref, "url": v.url,
            "promoted": promote})


@app.command()
def promote(
    name: str = typer.Argument(..., help="adapter name"),
    version: str = typer.Argument(..., help="the complete version `latest` should point to"),
    registry: str = RegistryOpt,
    family: str = FamilyOpt,
) -> None:
    """Move the `latest` pointer of NAME to VERSION (a version that does not exist changes nothing)."""
    v = _run(_registry(registry).promote, name, version, family)
    _print({"family": v.family, "name": v.name, "latest": v.version, "url": v.url})


if __name__ == "__main__":  # `python -m musiclora.cli.<group>` runs the group alone
    app()
