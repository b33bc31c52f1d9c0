"""The data path end to end: `musiclora corpus build` (real Debian music + a rendered Bach
chorale) -> `prepare` on Ray Data into the embedded S3 store -> the reader over 2 ranks x 2
DataLoader workers streams exactly the manifest's samples, each once, with equal batch counts."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from musiclora.config import PrepareConfig
from musiclora.data.metadata import load_metadata
from musiclora.data.shards import ShardStream, epoch_loader, load_manifest, shard_urls
from musiclora.storage import join_url, open_url

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("apt-get") is None or shutil.which("fluidsynth") is None,
                       reason="needs Debian's apt-get and fluidsynth (scripts/setup.sh installs it)"),
]
REPO = Path(__file__).resolve().parents[2]


def prepare_job(cluster, cfg: PrepareConfig, tmp_path: Path, *args: str) -> tuple[int, str, dict | None]:
    """`ray job submit ray_jobs/prepare.py` with `cfg` written as its YAML (a fresh driver process)."""
    import yaml

    from .jobs import submit

    path = tmp_path / f"prepare-{abs(hash(cfg.output_url))}.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump()))
    return submit(cluster, "ray_jobs/prepare.py", "--config", str(path), *args)


@pytest.fixture(scope="module")
def demo_corpus() -> dict:
    """`musiclora corpus build --name demo --max-tracks 3`: one track of each of its three sources."""
    cache = REPO / ".musiclora" / "cache" / "corpus"
    exe = str(Path(sys.executable).parent / "musiclora")
    proc = subprocess.run(
        [exe, "corpus", "build", "--name", "demo", "--max-tracks", "3", "--cache-dir", str(cache)],
        check=False, capture_output=True, text=True, timeout=900, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_corpus_captions_carry_metadata_and_analysis(demo_corpus):
    assert demo_corpus["num_tracks"] == 3 and demo_corpus["score_sets"] == ["bach-chorales-demo"]
    tracks = load_metadata(demo_corpus["metadata_path"])
    chorale = next(t for t in tracks if t.model_extra["source_package"].startswith("music21="))
    extra = chorale.model_extra
    assert extra["metre"] and chorale.key and chorale.bpm and extra["instruments"]
    for phrase in (f"in {chorale.key}", f"{extra['metre']} time", f"{chorale.bpm:.0f} BPM", "Johann Sebastian Bach"):
        assert phrase in chorale.caption
    assert extra["duration_s"] > 20
    recorded = [t for t in tracks if t is not chorale]
    assert all(t.bpm and f"{t.bpm:.0f} BPM" in t.caption for t in recorded)  # estimated tempo in the caption


def test_prepare_then_read_over_2_ranks_x_2_workers(ray_cluster, s3_bucket_url, demo_corpus, tmp_path):
    out = f"{s3_bucket_url}/shards/demo"
    cfg = PrepareConfig(base="tiny", metadata=demo_corpus["metadata_path"], output_url=out, segment_s=4.0,
                        min_s=2.0, max_segments_per_track=3, samples_per_shard=2, val_fraction=0.0)  # fmt: skip
    rc, log, result = prepare_job(ray_cluster, cfg, tmp_path, "--tracks-per-task", "1", "--concurrency", "2")
    assert rc == 0, log[-4000:]
    manifest = load_manifest(out)

    assert manifest["num_tracks"] == result["num_tracks"] == 3 and manifest["num_skipped"] == 0
    assert manifest["num_samples"] == result["num_samples"]
    assert manifest["feature_spec"]["codec"] == "encodec" and manifest["throughput"]["input_audio_s_per_s"] > 0
    for shard in manifest["shards"]:  # the manifest's sha256 and sizes are the stored objects'
        with open_url(join_url(out, shard["name"]), "rb") as f:
            data = f.read()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["num_bytes"]

    urls = shard_urls(out, "train", manifest)
    keys, batch_counts, pads = [], [], 0
    for rank in range(2):
        stream = ShardStream(urls, rank=rank, world_size=2, seed=3, shuffle_buffer=4)
        batches = list(epoch_loader(stream, 2, lambda s: s, loader_workers=2))
        batch_counts.append(len(batches))
        for batch in batches:
            for sample in batch:
                assert sample["codes.npy"].shape[0] == manifest["feature_spec"]["num_codebooks"]
                assert sample["chroma.npy"].shape[1] == 12 and sample["json"]["caption"]
                if sample.get("__pad__"):
                    pads += 1
                else:
                    keys.append(sample["__key__"])
    total = manifest["num_samples"]["train"]
    assert len(keys) == total and len(set(keys)) == total  # each sample exactly once
    assert pads == (-total) % 2
    assert batch_counts[0] == batch_counts[1] == stream.batches_per_epoch(2, 2)
    per_track = Counter(k.split("_")[0] for k in keys)
    assert sorted(per_track.values()) == [3, 3, 3]  # max_segments_per_track of each of the 3 tracks
