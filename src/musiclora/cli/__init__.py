"""`musiclora` command line: one module per command group, assembled in `main.py`."""

from musiclora.cli.main import app

__all__ = ["app"]
