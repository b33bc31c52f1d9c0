"""Exact resume through the real parts (Ray cluster, S3 store, DeepSpeed, `ray job submit`).

A: 8 steps uninterrupted. B: the same run with one Train worker SIGKILLed after step 3, once Ray
Train has registered a checkpoint (step 2, 4 or 6); Ray Train restarts the group from its last
registered checkpoint. B must
consume A's sample ids in A's order and end with A's adapter (fp32, max abs diff 1e-5), under
ZeRO-2 and ZeRO-3.
C: the same 32 samples consumed by 2, then 1, then 4 workers (a resumed run with another worker
count): the same ids in the same order, nothing twice, nothing skipped.
"""

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
import torch

from musiclora.data.order import sample_ids
from musiclora.storage import get_fs, join_url

from .jobs import REPO, SHARDS, submit

pytestmark = pytest.mark.integration
RUNS = "s3://musiclora-it/runs"
COMMON = ["--config", "ray_jobs/configs/musicgen_melody_tiny.yaml", "data.batch_size=2", "optim.warmup_steps=2",
          f"run.storage_path={RUNS}", "run.adapters_url=s3://musiclora-it/adapters", "run.checkpoint_every=2",
          "run.log_every=1", "data.seed=7"]


def _ray(cluster, command: str, job_id: str) -> str:
    """`ray job <command> <job_id>` (logs / status) against the test cluster."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    out = subprocess.run([ray_bin, "job", command, "--address", cluster.dashboard_url, job_id],
                         env={**os.environ, **cluster.env()}, capture_output=True, text=True, timeout=120, check=False)
    return out.stdout + out.stderr


def _final_state(name: str) -> dict:
    """state.json of the run's checkpoint with the most steps."""
    fs, root = get_fs(join_url(RUNS, name))
    states = [json.loads(fs.cat_file(p)) for p in fs.glob(f"{root}/**/state.json")]
    assert states, f"no checkpoint state under {RUNS}/{name}"
    return max(states, key=lambda s: s["step"])


def _adapter(result: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    fs, path = get_fs(result["adapter_url"] + "/adapter_model.safetensors")
    return load(fs.cat_file(path))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _train(cluster, base: str, name: str, *extra: str) -> dict:
    rc, out, result = submit(cluster, "ray_jobs/train.py", *COMMON, f"model.base={base}", f"data.shards_url={SHARDS}",
                             f"run.name={name}", *extra)
    assert rc == 0, out[-4000:]
    return result


def _registered_checkpoints(name: str) -> int:
    """Checkpoints Ray Train's controller has registered for run `name` (its manager snapshot in storage).

    A worker logs "Checkpoint successfully created" before the controller collects the report; a
    group killed in between restarts from the checkpoint before (measured: from step 0 after a
    kill at step 3). Only registered checkpoints are promised to a restarted group.
    """
    fs, root = get_fs(join_url(RUNS, name))
    fs.invalidate_cache()
    try:
        snapshot = json.loads(fs.cat_file(f"{root}/checkpoint_manager_snapshot.json"))
    except FileNotFoundError:
        return 0
    return len(snapshot.get("checkpoint_results", []))


def _train_killed(cluster, base: str, name: str, *extra: str) -> str:
    """Run B: submit, SIGKILL one Train worker once step 3 is logged and a checkpoint is registered,
    wait for success; returns the logs."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    args = [*COMMON, f"model.base={base}", f"data.shards_url={SHARDS}", f"run.name={name}", *extra]
    sub = subprocess.run([ray_bin, "job", "submit", "--no-wait", "--address", cluster.dashboard_url, "--",
                          sys.executable, str(REPO / "ray_jobs/train.py"), *args],
                         env={**os.environ, **cluster.env()}, capture_output=True, text=True, timeout=120, check=False)
    job_id = re.search(r"raysubmit_\w+", sub.stdout + sub.stderr).group(0)
    killed, deadline = None, time.time() + 600
    while killed is None and time.time() < deadline:
        logs = _ray(cluster, "logs", job_id)
        pids = re.findall(r"RayTrainWorker pid=(\d+)\).*\[musiclora\] step 3/", logs)
        if pids and _registered_checkpoints(name):
            killed = int(pids[-1])
            os.kill(killed, signal.SIGKILL)
        assert "failed" not in _ray(cluster, "status", job_id).lower()
        time.sleep(1)
    assert killed, "run B never reached step 3"
    while time.time() < deadline and not re.search(r"succeeded|failed|stopped", _ray(cluster, "status", job_id).lower()):
        time.sleep(3)
    logs = _ray(cluster, "logs", job_id)
    assert "succeeded" in _ray(cluster, "status", job_id).lower(), logs[-4000:]
    return logs


@pytest.fixture(scope="module")
def run_a(ray_cluster, s3_store, shards, tiny_musicgen_dir) -> dict:
    """Run A: 8 steps, 2 workers, uninterrupted."""
    return _train(ray_cluster, tiny_musicgen_dir, "it-exact-a", "optim.max_steps=8")


def test_killed_run_ends_where_the_uninterrupted_run_ends(ray_cluster, shards, tiny_musicgen_dir, run_a):
    a = run_a
    logs = _train_killed(ray_cluster, tiny_musicgen_dir, "it-exact-b", "optim.max_steps=8", "run.max_failures=2")
    starts = [int(s) for s in re.findall(r"starting at step (\d+)", logs)]
    assert starts[0] == 0 and max(starts) in (2, 4, 6), starts  # the group restarted from a checkpoint
    b = json.loads(logs.split("MUSICLORA_RESULT ", 1)[1].splitlines()[0])

    state_a, state_b = _final_state("it-exact-a"), _final_state("it-exact-b")
    n = shards["num_samples"]["train"]
    assert state_a["consumed"] == sample_ids(0, 32, n, 7).tolist()  # 8 steps x 2 workers x batch 2
    assert state_b["consumed"] == state_a["consumed"]
    assert state_b["data"] == state_a["data"] and state_b["optimizer"] == state_a["optimizer"]
    assert _max_diff(_adapter(a), _adapter(b)) <= 1e-5


def test_killed_run_ends_where_the_uninterrupted_run_ends_under_zero3(ray_cluster, shards, tiny_musicgen_dir):
    stage = "deepspeed.zero_stage=3"
    a = _train(ray_cluster, tiny_musicgen_dir, "it-exact-a3", "optim.max_steps=8", stage)
    logs = _train_killed(ray_cluster, tiny_musicgen_dir, "it-exact-b3", "optim.max_steps=8", "run.max_failures=2", stage)
    assert max(int(s) for s in re.findall(r"starting at step (\d+)", logs)) in (2, 4, 6)
    b = json.loads(logs.split("MUSICLORA_RESULT ", 1)[1].splitlines()[0])
    assert _final_state("it-exact-b3")["consumed"] == _final_state("it-exact-a3")["consumed"]
    assert _max_diff(_adapter(a), _adapter(b)) <= 1e-5


def test_resume_with_other_worker_counts_consumes_each_sample_once(ray_cluster, shards, tiny_musicgen_dir, run_a):
    """2 workers x 3 steps, then 1 worker x 2 steps, then 4 workers x 2 steps: 12 + 4 + 16 = 32 samples."""
    for workers, steps in ((2, 3), (1, 5), (4, 7)):
        result = _train(ray_cluster, tiny_musicgen_dir, "it-exact-c", f"optim.max_steps={steps}",
                        f"run.num_workers={workers}", "run.cpus_per_worker=0.5")
        assert result["steps"] == steps
    state = _final_state("it-exact-c")
    n = shards["num_samples"]["train"]
    assert state["consumed"] == sample_ids(0, 32, n, 7).tolist()
    epoch = state["consumed"][:n]
    assert sorted(epoch) == list(range(n))  # the first epoch: every sample once, none skipped
    assert state["data"]["position"] == 32 and state["data"]["epoch"] == 32 // n
    # The adapter follows another trajectory (other batch groupings, 7 steps instead of 8), so it is
    # only close to A's: every tensor within 10x the largest entry of A's trained lora_B.
    a, c = _adapter(run_a), _adapter(result)
    scale = max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k)
    assert 0 < _max_diff(a, c) <= 10 * scale
