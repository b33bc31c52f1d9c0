"""The vertical slice through `ray job submit`: real music -> shards in S3 -> LoRA under DeepSpeed -> peft adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from musiclora.storage import get_fs, open_url

from .jobs import REPO, SHARDS, submit

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_train_job_publishes_a_plain_peft_adapter(ray_cluster, s3_store, shards, tiny_musicgen_dir, zero_stage):
    name = f"it-zero{zero_stage}"
    rc, out, result = submit(
        ray_cluster, "ray_jobs/train.py", "--config", "ray_jobs/configs/musicgen_melody_tiny.yaml",
        f"model.base={tiny_musicgen_dir}", f"data.shards_url={SHARDS}", f"deepspeed.zero_stage={zero_stage}",
        "data.batch_size=2", "optim.max_steps=12", "optim.warmup_steps=2", "run.checkpoint_every=6",
        f"run.name={name}", "run.storage_path=s3://musiclora-it/runs", "run.adapters_url=s3://musiclora-it/adapters",
    )
    assert rc == 0, out[-4000:]
    assert result["steps"] == 12
    assert result["last_loss_mean"] < result["first_loss_mean"], result  # loss falls on real music
    adapter = result["adapter_url"]
    fs, path = get_fs(adapter)
    assert {"adapter_config.json", "adapter_model.safetensors", "card.json", "loss.png"} <= {
        p.rsplit("/", 1)[-1] for p in fs.ls(path)}
    with open_url(adapter + "/card.json") as f:
        card = json.load(f)
    assert card["adapter"]["r"] == 8 and card["training"]["deepspeed"]["zero_stage"] == zero_stage
    # plain transformers + peft, no musiclora import, in a fresh interpreter
    plain = subprocess.run([sys.executable, str(REPO / "examples/plain_peft_load.py"), tiny_musicgen_dir, adapter],
                           capture_output=True, text=True, env={**os.environ, **s3_store.env()}, timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    report = json.loads(plain.stdout.strip().splitlines()[-1])
    assert report["lora_tensors"] == 16 and report["max_logit_change"] > 0


def test_bad_config_fails_before_any_worker_starts(ray_cluster, s3_store, shards, tiny_musicgen_dir):
    rc, out, _ = submit(
        ray_cluster, "ray_jobs/train.py", "--config", "ray_jobs/configs/musicgen_melody_tiny.yaml",
        f"model.base={tiny_musicgen_dir}", f"data.shards_url={SHARDS}", "adapter.target_modules=[nope_proj]",
        "run.storage_path=s3://musiclora-it/runs", "run.adapters_url=s3://musiclora-it/adapters",
    )
    assert rc != 0 and "nope_proj" in out and "RayTrainWorker" not in out
    rc, out, _ = submit(
        ray_cluster, "ray_jobs/train.py", "--config", "ray_jobs/configs/musicgen_melody_tiny.yaml",
        f"model.base={tiny_musicgen_dir}", "data.shards_url=s3://musiclora-it/shards/none",
        "run.storage_path=s3://musiclora-it/runs", "run.adapters_url=s3://musiclora-it/adapters",
    )
    assert rc != 0 and "run `musiclora prepare` first" in out and "RayTrainWorker" not in out
