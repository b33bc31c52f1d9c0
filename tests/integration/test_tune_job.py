"""Ray Tune through `ray job submit`: 4 trials, ASHA on the validation loss, a KAD audio objective picking the
winner, registry, TensorBoard + MLflow, the report, restore."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .jobs import REPO, SHARDS_WITH_VAL, submit

pytestmark = pytest.mark.integration


def _tune_args(tmp_path, tiny, name, extra=()):
    return ["--config", "ray_jobs/configs/tune_musicgen_melody_tiny.yaml", f"name={name}",
            f"storage_path=file://{tmp_path}/tune", f"registry_url=file://{tmp_path}/registry",
            f"mlflow_tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            (f"train_overrides=[model.base={tiny}, data.shards_url={SHARDS_WITH_VAL}, data.batch_size=2, "
             "data.val_batches=1, optim.max_steps=12, run.checkpoint_every=6, run.log_every=2, run.eval_every=6, "
             "run.storage_path=s3://musiclora-it/runs, "
             "run.adapters_url=s3://musiclora-it/adapters]"), *extra]


def test_tune_search_asha_registry_dashboards(ray_cluster, s3_store, shards_with_val, tiny_musicgen_dir, tmp_path):
    audio = ["audio_objective={embedder: mel-stats, num_clips: 2, duration_s: 1.0}", "select_by=kad"]
    rc, out, _ = submit(ray_cluster, "ray_jobs/tune.py", *_tune_args(tmp_path, tiny_musicgen_dir, "it-tune", audio),
                        timeout_s=900)
    assert rc == 0, out[-5000:]
    from musiclora.adapter_registry import Registry
    from musiclora.tune.report import load_summary, write_report

    summary = load_summary(f"file://{tmp_path}/tune", "it-tune")
    trials = summary["trials"]
    assert len(trials) == 4
    assert not [t for t in trials if t["status"] == "errored"], trials  # an errored trial is no ASHA cut
    stopped = [t for t in trials if t["status"] == "stopped"]
    assert stopped, trials  # ASHA cut at least one
    # at a rung no earlier than the derived grace period (past the 5 warm-up steps), judged on a validation
    # of that very step
    assert all(t["step"] is not None and t["step"] >= 6 and t["val_step"] == t["step"] for t in stopped), stopped
    finished = [t for t in trials if t["status"] == "finished"]
    assert all(t["val_loss"] > 0 and t["val_base"] > 0 and t["kad_embedder"] == "mel-stats" for t in finished)
    best = summary["best"]
    assert summary["metric"] == "kad" and best["kad"] == min(t["kad"] for t in finished)
    reg = Registry(f"file://{tmp_path}/registry")
    shown = reg.show("it-tune")  # the registry name comes from the tune config (its `name` here)
    assert shown["card"]["tune"]["trial_id"] == best["trial_id"]
    assert shown["card"]["tune"]["metric"] == "kad" and shown["card"]["tune"]["val_loss"] == best["val_loss"]
    assert shown["card"]["adapter"]["r"] == best["adapter.r"]

    # TensorBoard event files and MLflow runs hold every trial's curve
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = glob.glob(f"{tmp_path}/tune/it-tune/**/events.out.tfevents.*", recursive=True)
    assert len({Path(e).parent for e in events}) == 4
    for e in events:
        acc = EventAccumulator(str(Path(e).parent))
        acc.Reload()
        assert any("loss" in tag for tag in acc.Tags()["scalars"])
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("it-tune")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 4 and all(len(client.get_metric_history(r.info.run_id, "val_loss")) >= 1 for r in runs)

    paths = write_report(summary, str(tmp_path / "report"))
    assert Path(paths["markdown"]).read_text().count("| ") > 4 and Path(paths["adapter.r"]).stat().st_size > 1000
    assert Path(paths["parallel_coordinates"]).stat().st_size > 1000


def test_tune_restores_without_rerunning_finished_trials(ray_cluster, s3_store, shards_with_val, tiny_musicgen_dir,
                                                         tmp_path):
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, **ray_cluster.env()}
    args = _tune_args(tmp_path, tiny_musicgen_dir, "it-restore", ["asha=null", "max_concurrent=1", "num_samples=2"])
    args = [a.replace("optim.max_steps=12", "optim.max_steps=6") for a in args]
    sub = subprocess.run([ray_bin, "job", "submit", "--no-wait", "--address", ray_cluster.dashboard_url, "--",
                          sys.executable, str(REPO / "ray_jobs/tune.py"), *args], env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    job = re.search(r"raysubmit_\w+", sub.stdout + sub.stderr).group(0)
    deadline = time.time() + 600
    finished: list[str] = []
    while time.time() < deadline:
        logs = subprocess.run([ray_bin, "job", "logs", "--address", ray_cluster.dashboard_url, job], env=env,
                              capture_output=True, text=True, timeout=60, check=False).stdout
        finished = re.findall(r"Trial _trial_(\w+) completed", logs)
        if len(finished) >= 1:
            break
        time.sleep(3)
    assert finished, "no trial finished before the deadline"
    subprocess.run([ray_bin, "job", "stop", "--address", ray_cluster.dashboard_url, job], env=env,
                   capture_output=True, text=True, timeout=120, check=False)
    rc, out, _ = submit(ray_cluster, "ray_jobs/tune.py", *args, timeout_s=900)
    assert rc == 0, out[-5000:]
    assert "restoring Tune experiment" in out
    # Tune saves its experiment state every few seconds: a trial that finished just before the stop may
    # still be recorded as running and is then resumed, from its final checkpoint. No step may run again.
    started = {tid: int(step) for tid, step in re.findall(r"run it-restore-(\w+): LoRA .*?starting at step (\d+)", out)}
    again = {tid: step for tid, step in started.items() if tid in finished and step < 6}
    assert not again, (started, finished)
    assert len(started) >= 1  # the unfinished trial ran
    from musiclora.tune.report import load_summary

    summary = load_summary(f"file://{tmp_path}/tune", "it-restore")
    assert len(summary["trials"]) == 2
    assert summary["metric"] == "val_loss"  # the default objective picks the winner
    assert summary["best"]["val_loss"] == min(t["val_loss"] for t in summary["trials"] if t["status"] == "finished")
