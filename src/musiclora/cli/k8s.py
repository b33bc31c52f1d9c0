"""`musiclora k8s render|secret`: the KubeRay manifests in k8s/ and the object-store Secret.

`render` regenerates what k8s/ repeats from the project's config (see `musiclora.k8s`);
`render --check` changes nothing and exits 1 when a generated file is stale. `secret` prints a
Secret with the object-store keys from the current AWS_* variables, for `kubectl apply -f -`.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from musiclora.cli.errors import console as _err
from musiclora.cli.errors import fail as _fail
from musiclora.k8s import (
    K8sRenderError,
    dump_yaml,
    find_repo,
    render,
    secret_manifest,
    stale_files,
    write_rendered,
)

app = typer.Typer(help="KubeRay manifests (k8s/) generated from the project's config.", no_args_is_help=True)



@app.command("render")
def render_cmd(
    repo: Path = typer.Option(None, help="repository root (default: the one containing the current folder)"),
    check: bool = typer.Option(False, "--check", help="write nothing; exit 1 if a generated file is stale"),
) -> None:
    """Write k8s/base/*, the gpu overlay's generated patches and k8s/secret.example.yaml."""
    try:
        root = Path(repo) if repo else find_repo()
        files = render(root)
    except K8sRenderError as exc:
        _fail(exc)
    if check:
        stale = stale_files(root, files)
        for rel in stale:
            _err.print(f"stale: {rel}")
        if stale:
            _err.print("run `musiclora k8s render` and commit the result")
            raise typer.Exit(1)
        _err.print(f"{len(files)} generated files up to date")
        return
    changed = write_rendered(root, files)
    for rel in files:
        print(f"{'wrote' if rel in changed else 'unchanged'} {rel}")


@app.command("secret")
def secret_cmd(
    namespace: str = typer.Option(None, help="namespace of the Secret (default: kubectl's current one)"),
    name: str = typer.Option("musiclora-s3", help="Secret name the Ray pods read"),
) -> None:
    """Print the object-store Secret from $AWS_ACCESS_KEY_ID / $AWS_SECRET_ACCESS_KEY (never written to disk)."""
    try:
        print(dump_yaml(secret_manifest(os.environ, name=name, namespace=namespace)), end="")
    except K8sRenderError as exc:
        _fail(exc)


if __name__ == "__main__":  # `python -m musiclora.cli.<group>` runs the group alone
    app()
