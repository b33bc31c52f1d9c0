"""Stable Audio Open through the same paths as the other families: real music -> 44.1 kHz shards in S3
(`ray job submit` prepare) -> LoRA on the DiT under DeepSpeed ZeRO-2 (`ray job submit` train), where the
loss falls -> an adapter that loads in plain diffusers / peft and changes the output -> `generate`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import soundfile as sf

from musiclora.storage import open_url

from .jobs import REPO, submit

pytestmark = pytest.mark.integration
SHARDS = "s3://musiclora-it/shards/stable-audio-open/corpus"


def test_stable_audio_lora_job_end_to_end(ray_cluster, s3_store, corpus_metadata, tiny_stable_audio_dir, tmp_path):
    os.environ.update(s3_store.env())
    rc, out, result = submit(
        ray_cluster, "ray_jobs/prepare.py", "--config", "ray_jobs/configs/prepare_stable_audio_open_tiny.yaml",
        f"metadata={corpus_metadata}", f"base={tiny_stable_audio_dir}", f"output_url={SHARDS}",
        "segment_s=4.0", "max_segments_per_track=3", "samples_per_shard=4",
    )
    assert rc == 0, out[-4000:]
    assert result["family"] == "stable-audio-open" and result["num_samples"]["train"] >= 6
    with open_url(SHARDS + "/manifest.json") as f:
        spec = json.load(f)["feature_spec"]
    assert spec["codec_sample_rate"] == 44100 and spec["channels"] == 2

    rc, out, result = submit(
        ray_cluster, "ray_jobs/train.py", "--config", "ray_jobs/configs/stable_audio_open_tiny.yaml",
        f"model.base={tiny_stable_audio_dir}", f"data.shards_url={SHARDS}", "optim.max_steps=12", "optim.lr=0.02",
        "optim.warmup_steps=2", "run.checkpoint_every=12", "run.name=it-stable-audio",
        "run.storage_path=s3://musiclora-it/runs", "run.adapters_url=s3://musiclora-it/adapters",
    )
    assert rc == 0, out[-4000:]
    assert result["steps"] == 12 and result["last_loss_mean"] < result["first_loss_mean"], result
    adapter = result["adapter_url"]
    with open_url(adapter + "/card.json") as f:
        card = json.load(f)
    assert card["family"] == "stable-audio-open" and "ff.net.2" in card["adapter"]["target_modules"]

    plain = subprocess.run([sys.executable, str(REPO / "examples/plain_stable_audio_load.py"), tiny_stable_audio_dir,
                            adapter], capture_output=True, text=True, env={**os.environ, **s3_store.env()},
                           timeout=300, check=False)
    assert plain.returncode == 0, plain.stdout[-2000:] + plain.stderr[-3000:]
    assert json.loads(plain.stdout.strip().splitlines()[-1])["max_output_change"] > 0

    from musiclora.generate import generate

    gen = generate("calm piano", str(tmp_path / "out.wav"), adapter=adapter, duration_s=1.0, steps=3)
    audio, rate = sf.read(gen["wav"], dtype="float32")
    assert gen["family"] == "stable-audio-open" and rate == 44100 and audio.shape == (44100, 2) and gen["rms"] > 0
    assert gen["channels"] == 2  # the family's stereo, written as a 2-channel WAV
