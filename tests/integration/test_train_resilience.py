"""Training in depth: a SIGKILLed worker resumes from its checkpoint, re-running a run name resumes,
early stopping stops a run whose validation loss stalls, and the best-by-validation adapter is kept."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from musiclora.storage import open_url

from .jobs import REPO, SHARDS, SHARDS_WITH_VAL, submit

pytestmark = pytest.mark.integration
COMMON = ["--config", "ray_jobs/configs/musicgen_melody_tiny.yaml", "data.batch_size=2",
          "run.storage_path=s3://musiclora-it/runs", "run.adapters_url=s3://musiclora-it/adapters"]


def _logs(cluster, job_id: str) -> str:
    ray_bin = str(Path(sys.executable).parent / "ray")
    return subprocess.run([ray_bin, "job", "logs", "--address", cluster.dashboard_url, job_id],
                          env={**os.environ, **cluster.env()}, capture_output=True, text=True, timeout=60).stdout


def _status(cluster, job_id: str) -> str:
    ray_bin = str(Path(sys.executable).parent / "ray")
    out = subprocess.run([ray_bin, "job", "status", "--address", cluster.dashboard_url, job_id],
                         env={**os.environ, **cluster.env()}, capture_output=True, text=True, timeout=60)
    return (out.stdout + out.stderr).lower()  # "Job '...' succeeded" / "failed" / "stopped"


def test_sigkilled_worker_resumes_from_last_checkpoint(ray_cluster, s3_store, shards, tiny_musicgen_dir):
    ray_bin = str(Path(sys.executable).parent / "ray")
    args = [*COMMON, f"model.base={tiny_musicgen_dir}", f"data.shards_url={SHARDS}", "run.name=it-kill",
            "optim.max_steps=24", "run.checkpoint_every=5", "run.max_failures=2"]
    sub = subprocess.run([ray_bin, "job", "submit", "--no-wait", "--address", ray_cluster.dashboard_url, "--",
                          sys.executable, str(REPO / "ray_jobs/train.py"), *args],
                         env={**os.environ, **ray_cluster.env()}, capture_output=True, text=True, timeout=120)
    job_id = re.search(r"raysubmit_\w+", sub.stdout + sub.stderr).group(0)
    killed, deadline = None, time.time() + 600
    while time.time() < deadline and killed is None:
        logs = _logs(ray_cluster, job_id)
        steps = [int(s) for s in re.findall(r"\[musiclora\] step (\d+)/24", logs)]
        pids = re.findall(r"RayTrainWorker pid=(\d+)\).*\[musiclora\] step", logs)
        if steps and max(steps) >= 7 and pids:
            killed = int(pids[-1])
            os.kill(killed, signal.SIGKILL)
        assert "failed" not in _status(ray_cluster, job_id)
        time.sleep(2)
    assert killed, "training never reached step 7"
    deadline = time.time() + 900
    while time.time() < deadline and not re.search(r"succeeded|failed|stopped", _status(ray_cluster, job_id)):
        time.sleep(3)
    logs = _logs(ray_cluster, job_id)
    assert "succeeded" in _status(ray_cluster, job_id), logs[-4000:]
    starts = [int(s) for s in re.findall(r"starting at step (\d+)", logs)]
    assert starts[0] == 0 and max(starts) >= 5, starts  # a restart resumed from a checkpoint, not from 0
    result = json.loads(logs.split("MUSICLORA_RESULT ", 1)[1].splitlines()[0])
    assert result["steps"] == 24

    # re-running the same run name resumes from its last checkpoint
    rc, out, again = submit(ray_cluster, "ray_jobs/train.py", *args[:-1], "optim.max_steps=28")
    assert rc == 0, out[-3000:]
    assert re.search(r"starting at step 24", out) and again["steps"] == 28


def test_early_stopping_keeps_the_best_adapter(ray_cluster, s3_store, shards_with_val, tiny_musicgen_dir):
    """lr ~ 0: validation loss cannot improve after the first evaluation, so patience 2 stops at step 6."""
    rc, out, result = submit(
        ray_cluster, "ray_jobs/train.py", *COMMON, f"model.base={tiny_musicgen_dir}",
        f"data.shards_url={SHARDS_WITH_VAL}", "run.name=it-early", "optim.lr=1e-12", "optim.max_steps=50",
        "run.eval_every=2", "run.early_stopping_patience=2", "run.checkpoint_every=10",
    )
    assert rc == 0, out[-4000:]
    assert result["steps"] == 6
    with open_url(result["adapter_url"] + "/card.json") as f:
        card = json.load(f)["training"]
    assert card["stopped_early"] and card["best"]["step"] == 2 and card["selected"] == "best-by-validation"
    assert [v[0] for v in card["val"]] == [2, 4, 6]


def test_validation_with_learning_improves_and_publishes_best(ray_cluster, s3_store, shards_with_val,
                                                              tiny_musicgen_dir):
    rc, out, result = submit(
        ray_cluster, "ray_jobs/train.py", *COMMON, f"model.base={tiny_musicgen_dir}",
        f"data.shards_url={SHARDS_WITH_VAL}", "run.name=it-val", "optim.max_steps=12", "run.eval_every=4",
        "deepspeed.zero_stage=3", "optim.gradient_checkpointing=true",
    )
    assert rc == 0, out[-4000:]
    with open_url(result["adapter_url"] + "/card.json") as f:
        card = json.load(f)["training"]
    vals = [v[1] for v in card["val"]]
    assert len(vals) == 3 and vals[-1] < vals[0]
    assert card["best"]["val_loss"] == min(vals)
