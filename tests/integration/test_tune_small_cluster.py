"""`musiclora tune run`, the command a user runs, on a local Ray of 2 CPUs (a 2-core machine).

The shipped tiny tune config asks for worker groups of 2 workers x 1 CPU. Before the fix Tune
ignored the concurrency limit (a `SearchGenerator` was passed with `max_concurrent_trials`), every
trial started at once and their worker groups waited for CPUs forever. Now the search runs one
trial at a time there and finishes; a trial that still cannot get its workers (forced here with
`max_concurrent=2`) errors after `worker_start_attempts` and is reported, and the rest finish.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .jobs import REPO, SHARDS_WITH_VAL

pytestmark = pytest.mark.integration

STEPS = 4


def _tune_run(cluster, s3_store, tmp_path, tiny, name: str, *extra: str) -> subprocess.CompletedProcess:
    """`musiclora tune run` with the shipped tiny config, connected to `cluster` like a user's shell."""
    exe = str(Path(sys.executable).parent / "musiclora")
    env = {**os.environ, **s3_store.env(), **cluster.env(), "RAY_ADDRESS": cluster.address,
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    args = [exe, "tune", "run", "--config", str(REPO / "ray_jobs/configs/tune_musicgen_melody_tiny.yaml"),
            f"name={name}", f"storage_path=file://{tmp_path}/tune", f"registry_url=file://{tmp_path}/registry",
            f"mlflow_tracking_uri=sqlite:///{tmp_path}/mlflow.db", "num_samples=2",
            (f"train_overrides=[model.base={tiny}, data.shards_url={SHARDS_WITH_VAL}, data.batch_size=2, "
             f"data.val_batches=1, optim.max_steps={STEPS}, optim.warmup_steps=1, run.checkpoint_every={STEPS}, "
             "run.log_every=2, run.eval_every=2, "
             "run.storage_path=s3://musiclora-it/runs, run.adapters_url=s3://musiclora-it/adapters]"), *extra]
    return subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False)


def test_tune_run_on_two_cpus_finishes_and_reports_a_trial_without_workers(two_cpu_ray, s3_store, shards_with_val,
                                                                          tiny_musicgen_dir, tmp_path):
    from musiclora.adapter_registry import Registry
    from musiclora.tune.report import load_summary

    run = _tune_run(two_cpu_ray, s3_store, tmp_path, tiny_musicgen_dir, "two-cpu")
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-5000:]
    assert "max_concurrent_trials` will be ignored" not in out
    assert "2 trials, at most 1 at once" in out
    trials = load_summary(f"file://{tmp_path}/tune", "two-cpu")["trials"]
    assert len(trials) == 2 and {t["status"] for t in trials} <= {"finished", "stopped"}, trials
    assert any(t["status"] == "finished" and t["step"] == STEPS for t in trials), trials
    assert Registry(f"file://{tmp_path}/registry").show("two-cpu")["card"]["tune"]["experiment"] == "two-cpu"

    # two worker groups of 2 CPUs on 2 CPUs: one trial cannot start its workers and is reported
    forced = _tune_run(two_cpu_ray, s3_store, tmp_path, tiny_musicgen_dir, "two-cpu-forced",
                       "max_concurrent=2", "worker_start_attempts=1", "asha=null")
    out = forced.stdout + forced.stderr
    assert forced.returncode == 0, out[-5000:]
    trials = load_summary(f"file://{tmp_path}/tune", "two-cpu-forced")["trials"]
    assert sorted(t["status"] for t in trials) == ["errored", "finished"], trials
    (errored,) = [t for t in trials if t["status"] == "errored"]
    assert "worker group startup timed out" in errored["error"], errored["error"]
    assert f"trial {errored['trial_id']} errored" in out
