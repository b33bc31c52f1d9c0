"""AudioLDM2 through the same paths as the other families: real music -> shards in S3 (`ray job submit`
prepare) -> LoRA on the UNet under DeepSpeed ZeRO-2 (`ray job submit` train), where the loss falls ->
an adapter that loads in plain diffusers / peft and changes the output -> `generate` with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import soundfile as sf

from musiclora.storage import get_fs, open_url

from .jobs import REPO, submit

pytestmark = pytest.mark.integration
SHARDS = "s3://musiclora-it/shards/audioldm2/corpus"


def test_audioldm2_lora_job_end_to_end(ray_cluster, s3_store, corpus_metadata, tiny_audioldm2_dir, tmp_path):
    os.environ.update(s3_store.env())
    rc, out, result = submit(
        ray_cluster, "ray_jobs/prepare.py", "--config", "ray_jobs/configs/prepare_audioldm2_tiny.yaml",
        f"metadata={corpus_metadata}", f"base={tiny_audioldm2_dir}", f"output_url={SHARDS}",
        "segment_s=5.12", "max_segments_per_track=3", "samples_per_shard=4",
    )
    assert rc == 0, out[-4000:]
    assert result["family"] == "audioldm2" and result["num_samples"]["train"] >= 6
    with open_url(SHARDS + "/manifest.json") as f:
        spec = json.load(f)["feature_spec"]
    assert spec["family"] == "audioldm2" and {"t5.npy", "generated.npy"} <= set(spec["fields"])

    rc, out, result = submit(
        ray_cluster, "ray_jobs/train.py", "--config", "ray_jobs/configs/audioldm2_tiny.yaml",
        f"model.base={tiny_audioldm2_dir}", f"data.shards_url={SHARDS}", "optim.max_steps=30", "optim.lr=0.02",
        "optim.warmup_steps=2", "run.checkpoint_every=30", "run.name=it-audioldm2",
        "run.storage_path=s3://musiclora-it/runs", "run.adapters_url=s3://musiclora-it/adapters",
    )
    assert rc == 0, out[-4000:]
    assert result["steps"] == 30
    assert result["last_loss_mean"] < result["first_loss_mean"], result  # loss falls on real music
    adapter = result["adapter_url"]
    fs, path = get_fs(adapter)
    assert {"adapter_config.json", "adapter_model.safetensors", "card.json"} <= {p.rsplit("/", 1)[-1] for p in fs.ls(path)}
    with open_url(adapter + "/card.json") as f:
        card = json.load(f)
    assert card["family"] == "audioldm2" and "time_embedding.linear_1" in card["adapter"]["target_modules"]

    plain = subprocess.run([sys.executable, str(REPO / "examples/plain_audioldm2_load.py"), tiny_audioldm2_dir, adapter],
                           capture_output=True, text=True, env={**os.environ, **s3_store.env()}, timeout=300,
                           check=False)
    assert plain.returncode == 0, plain.stdout[-2000:] + plain.stderr[-3000:]
    report = json.loads(plain.stdout.strip().splitlines()[-1])
    assert report["max_output_change"] > 0 and report["lora_tensors"] > 0

    from musiclora.generate import generate

    gen = generate("calm piano", str(tmp_path / "out.wav"), adapter=adapter, duration_s=1.0, steps=3)
    audio, rate = sf.read(gen["wav"], dtype="float32")
    assert gen["family"] == "audioldm2" and rate == 16000 and audio.shape == (16000,) and gen["rms"] > 0
