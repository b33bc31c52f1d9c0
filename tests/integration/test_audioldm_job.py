"""AudioLDM through the same path as MusicGen: real music -> shards in S3 (`ray job submit` prepare) ->
LoRA on the UNet under DeepSpeed ZeRO-2 (`ray job submit` train) -> an adapter that loads in plain
diffusers / peft and changes the output -> generation from text and from a reference WAV."""

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
SHARDS = "s3://musiclora-it/shards/audioldm/corpus"


@pytest.fixture(scope="module")
def tiny_audioldm_dir(tmp_path_factory):
    from musiclora.models.families import get_family

    return get_family("audioldm").save_tiny(str(tmp_path_factory.mktemp("tiny_audioldm")))


@pytest.fixture(scope="module")
def audioldm_shards(ray_cluster, s3_store, corpus_metadata, tiny_audioldm_dir):
    os.environ.update(s3_store.env())
    rc, out, result = submit(
        ray_cluster, "ray_jobs/prepare.py", "--config", "ray_jobs/configs/prepare_audioldm_tiny.yaml",
        f"metadata={corpus_metadata}", f"base={tiny_audioldm_dir}", f"output_url={SHARDS}",
        "segment_s=5.12", "max_segments_per_track=4", "samples_per_shard=4",
    )
    assert rc == 0, out[-4000:]
    assert result["family"] == "audioldm" and result["num_samples"]["train"] >= 8
    return result


def test_audioldm_lora_job_end_to_end(ray_cluster, s3_store, audioldm_shards, tiny_audioldm_dir, corpus_metadata,
                                      tmp_path):
    with open_url(SHARDS + "/manifest.json") as f:
        spec = json.load(f)["feature_spec"]
    assert spec["family"] == "audioldm" and spec["latent_channels"] == 8 and spec["mel"]["hop_length"] == 160

    rc, out, result = submit(
        ray_cluster, "ray_jobs/train.py", "--config", "ray_jobs/configs/audioldm_tiny.yaml",
        f"model.base={tiny_audioldm_dir}", f"data.shards_url={SHARDS}", "adapter.preset=attn+time",
        "optim.max_steps=40", "optim.lr=0.02", "run.checkpoint_every=20", "run.name=it-audioldm",
        "run.storage_path=s3://musiclora-it/runs", "run.adapters_url=s3://musiclora-it/adapters",
    )
    assert rc == 0, out[-4000:]
    assert result["steps"] == 40
    assert result["last_loss_mean"] < result["first_loss_mean"], result  # loss falls on real music
    adapter = result["adapter_url"]
    fs, path = get_fs(adapter)
    assert {"adapter_config.json", "adapter_model.safetensors", "card.json"} <= {p.rsplit("/", 1)[-1] for p in fs.ls(path)}
    with open_url(adapter + "/card.json") as f:
        card = json.load(f)
    assert card["family"] == "audioldm" and "time_embedding.linear_1" in card["adapter"]["target_modules"]

    # plain diffusers + peft onto a bare UNet, no musiclora import, in a fresh interpreter
    plain = subprocess.run([sys.executable, str(REPO / "examples/plain_audioldm_load.py"), tiny_audioldm_dir, adapter],
                           capture_output=True, text=True, env={**os.environ, **s3_store.env()}, timeout=300,
                           check=False)
    assert plain.returncode == 0, plain.stdout[-2000:] + plain.stderr[-3000:]
    report = json.loads(plain.stdout.strip().splitlines()[-1])
    assert report["max_output_change"] > 0 and report["lora_tensors"] > 0

    # audio-conditioned generation with the adapter, from a WAV cut out of a corpus track
    from musiclora.audio import load_audio, to_mono
    from musiclora.generate import generate

    with open(corpus_metadata) as f:
        track = json.loads(f.readline())["path"]
    wav, sr = load_audio(track)
    clip = tmp_path / "reference.wav"
    sf.write(clip, to_mono(wav)[30 * sr : 36 * sr], sr)
    ref = generate("", str(tmp_path / "from_reference.wav"), adapter=adapter, duration_s=2.0, steps=5,
                   reference=str(clip))
    audio, rate = sf.read(ref["wav"], dtype="float32")
    assert ref["family"] == "audioldm" and rate == 16000 and audio.shape == (32000,) and ref["rms"] > 0
    assert (tmp_path / "from_reference.png").stat().st_size > 0


def test_shards_of_one_family_are_refused_by_the_other(s3_store, audioldm_shards, tiny_musicgen_dir):
    """The trainer's driver-side preflight (what `ray_jobs/train.py` runs before any worker starts)."""
    from musiclora.config import load_config
    from musiclora.train.trainer import PreflightError, preflight

    cfg = load_config(REPO / "ray_jobs/configs/musicgen_melody_tiny.yaml", [
        f"model.base={tiny_musicgen_dir}", f"data.shards_url={SHARDS}",
        "run.storage_path=s3://musiclora-it/runs", "run.adapters_url=s3://musiclora-it/adapters"])
    with pytest.raises(PreflightError, match="prepared for family 'audioldm'"):
        preflight(cfg)
