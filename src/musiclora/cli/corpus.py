"""`musiclora corpus build`: real music to train on (Debian's music packages, music21 scores)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from musiclora.cli.errors import fail

app = typer.Typer(help="Real music to train on.", no_args_is_help=True)


@app.command("build")
def build(
    name: str = typer.Option("demo", help="corpus name (see musiclora.data.corpus.CORPORA)"),
    cache_dir: Path = typer.Option(Path(".musiclora/cache/corpus"), help="download/extract folder"),
    max_tracks: int = typer.Option(None, help="keep at most this many tracks"),
) -> None:
    """Fetch real music from Debian's music packages (apt-get download + dpkg -x) and write metadata.jsonl."""
    from musiclora.data.corpus import build_corpus, corpus_info_to_dict

    try:
        info = build_corpus(name, cache_dir=cache_dir, max_tracks=max_tracks)
    except (ValueError, OSError, RuntimeError) as exc:
        fail(exc)
    print(json.dumps(corpus_info_to_dict(info), default=str))
