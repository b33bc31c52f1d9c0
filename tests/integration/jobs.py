"""Helpers for integration tests that go through `ray job submit` (the real CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARDS = "s3://musiclora-it/shards/musicgen-melody/corpus"
SHARDS_WITH_VAL = "s3://musiclora-it/shards/musicgen-melody/corpus-val"


def submit(cluster, script: str, *args: str, timeout_s: float = 600) -> tuple[int, str, dict | None]:
    """`ray job submit` `python <script> <args>` to `cluster`; returns (exit code, output, MUSICLORA_RESULT)."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    cmd = [ray_bin, "job", "submit", "--address", cluster.dashboard_url, "--", sys.executable,
           str(REPO / script), *args]
    proc = subprocess.run(cmd, env={**os.environ, **cluster.env()}, capture_output=True, text=True, timeout=timeout_s)
    out = proc.stdout + proc.stderr
    result = next((json.loads(line.split("MUSICLORA_RESULT ", 1)[1]) for line in out.splitlines()
                   if "MUSICLORA_RESULT " in line), None)
    return proc.returncode, out, result
