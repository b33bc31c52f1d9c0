"""Bad input to `prepare`: planted bad files and metadata rows are skipped, each listed in the
manifest with its reason; storage mistakes fail early with a message naming the input; re-running
on the same input and config reproduces the same shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from musiclora.config import PrepareConfig
from musiclora.data.metadata import load_tracks
from musiclora.data.shards import ShardStream, load_manifest, shard_urls
from musiclora.storage import BucketNotFoundError, StorageAccessDeniedError, StoreUnreachableError, open_url
from musiclora.store import find_free_s3_port

pytestmark = pytest.mark.integration



def music(seconds: float, sr: int, seed: int, channels: int = 1) -> np.ndarray:
    """Notes with harmonics and an envelope: audible, pitched, not silent."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(int(seconds * 4)):
        f = 220 * 2 ** (rng.integers(0, 24) / 12)
        t = np.arange(sr // 4) / sr
        out.append(sum(0.3 / h * np.sin(2 * np.pi * f * h * t) for h in (1, 2, 3)) * np.exp(-3 * t))
    x = np.concatenate(out).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A folder of two good tracks and seven bad inputs; returns (folder, {file: reason fragment})."""
    root = tmp_path_factory.mktemp("planted")
    sf.write(root / "good_a.wav", music(9, 44100, 0, channels=2), 44100)
    sf.write(root / "good_b.flac", music(7, 48000, 1), 48000)
    (root / "corrupt.wav").write_bytes(b"RIFF" + np.random.default_rng(2).bytes(4000))
    sf.write(root / "full.wav", music(5, 22050, 3), 22050, subtype="PCM_16")
    data = (root / "full.wav").read_bytes()
    (root / "truncated.wav").write_bytes(data[: len(data) // 2])
    (root / "full.wav").unlink()
    (root / "empty.flac").write_bytes(b"")
    (root / "notes.mp3").write_text("these are my notes, not an mp3\n" * 20)
    sf.write(root / "silent.wav", np.zeros(5 * 16000, np.float32), 16000)
    sf.write(root / "short.wav", music(0.5, 16000, 4), 16000)
    (root / "readme.txt").write_text("not audio")
    expected = {
        "corrupt.wav": "not readable as audio", "truncated.wav": "truncated", "empty.flac": "empty",
        "notes.mp3": "AudioDecodeError", "silent.wav": "silent", "short.wav": "too short",
        "readme.txt": "not an audio file",
    }  # fmt: skip
    return root, expected


def _cfg(metadata, out, **kw) -> PrepareConfig:
    base = {"base": "tiny", "metadata": str(metadata), "output_url": out, "segment_s": 2.0, "min_s": 1.5,
            "samples_per_shard": 3}
    return PrepareConfig(**{**base, **kw})


def run_prepare(cluster, cfg: PrepareConfig, tmp_path, *args: str) -> dict:
    """`prepare` as a Ray job (a fresh driver process); returns the manifest it wrote."""
    from .test_data_pipeline import prepare_job

    rc, log, _ = prepare_job(cluster, cfg, tmp_path, *args)
    assert rc == 0, log[-4000:]
    return load_manifest(cfg.output_url)


def test_planted_bad_files_are_listed_with_reasons_and_runs_reproduce(ray_cluster, s3_bucket_url, planted, tmp_path):
    root, expected = planted
    first = run_prepare(ray_cluster, _cfg(root, f"{s3_bucket_url}/a"), tmp_path)
    skipped = {s["path"].rsplit("/", 1)[1]: s["reason"] for s in first["skipped"]}
    assert set(skipped) == set(expected)
    for name, fragment in expected.items():
        assert fragment in skipped[name], (name, skipped[name])
    assert first["num_skipped"] == len(expected) and first["num_tracks"] == 2
    assert first["num_samples"]["train"] == 4 + 3  # 9 s and 7 s tracks in 2 s segments (last >= 1.5 s kept)

    again = run_prepare(ray_cluster, _cfg(root, f"{s3_bucket_url}/b"), tmp_path, "--tracks-per-task", "1",
                        "--concurrency", "2")
    assert [(s["name"], s["sha256"]) for s in again["shards"]] == [(s["name"], s["sha256"]) for s in first["shards"]]


def test_metadata_rows_with_problems_are_skipped_and_augmentation_retunes_captions(
    ray_cluster, s3_bucket_url, planted, tmp_path
):
    root, _ = planted
    rows = [
        json.dumps({"path": str(root / "good_a.wav"), "caption": "harp etude in A minor, 120 BPM", "bpm": 120,
                    "key": "A minor"}).encode(),
        json.dumps({"path": str(root / "good_b.flac")}).encode(),
        b'{"path": "' + str(root / "good_b.flac").encode() + b'", "caption": "chanson fran\xe7aise"}',
        json.dumps({"path": str(root / "missing.wav"), "caption": "not there"}).encode(),
        json.dumps({"path": str(root / "good_b.flac"), "caption": "x", "bpm": -3}).encode(),
        b"{not json",
    ]  # fmt: skip
    meta = tmp_path / "metadata.jsonl"
    meta.write_bytes(b"\n".join(rows) + b"\n")
    out = f"{s3_bucket_url}/aug"
    manifest = run_prepare(ray_cluster, _cfg(meta, out, augment_copies=1, pitch_shift_semitones=3, noise_snr_db=30.0),
                           tmp_path)

    reasons = [s["reason"] for s in manifest["skipped"]]
    assert len(reasons) == 5
    for fragment in ("line 2 has no 'caption'", "line 3 is not valid UTF-8", "missing.wav", "line 5: bpm",
                     "line 6 is not valid JSON"):  # fmt: skip
        assert any(fragment in r for r in reasons), (fragment, reasons)
    assert all("metadata.jsonl" in r for r in reasons if "missing.wav" not in r)

    samples = list(ShardStream(shard_urls(out, "train", load_manifest(out))))
    originals = [s for s in samples if "augmentation" not in s["json"]]
    copies = [s for s in samples if "augmentation" in s["json"]]
    assert len(originals) == len(copies) == 4
    aug = copies[0]["json"]["augmentation"]
    assert aug["semitones"] in (-3, -2, -1, 1, 2, 3) and 30 <= aug["noise_snr_db"] <= 40
    assert copies[0]["json"]["key"] != "A minor" and f"in {copies[0]['json']['key']}" in copies[0]["json"]["caption"]
    assert originals[0]["json"]["caption"] == "harp etude in A minor, 120 BPM"


def test_a_csv_without_required_columns_fails_naming_file_and_column(tmp_path):
    meta = tmp_path / "tracks.csv"
    meta.write_text("file,description\na.wav,x\n")
    with pytest.raises(ValueError, match=r"tracks\.csv: missing required column 'path', 'caption'"):
        load_tracks(meta)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tracks(tmp_path / "nowhere")


def test_storage_mistakes_name_the_input(s3_env, s3_bucket_url, monkeypatch, tmp_path):
    from musiclora.data.prepare import prepare

    with open_url(f"{s3_bucket_url}/music/metadata.jsonl", "wb") as f:
        f.write(b'{"path": "a.wav", "caption": "x"}\n')
    tracks, skipped = load_tracks(f"{s3_bucket_url}/music")  # a bucket folder with a metadata file
    assert tracks[0].path == f"{s3_bucket_url}/music/a.wav" and not skipped

    with pytest.raises(BucketNotFoundError, match="no-such-bucket-musiclora"):
        load_tracks("s3://no-such-bucket-musiclora/music/metadata.jsonl")
    with pytest.raises(BucketNotFoundError, match="no-such-bucket-musiclora"):
        load_manifest("s3://no-such-bucket-musiclora/shards")

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(StorageAccessDeniedError, match=s3_bucket_url):
        load_tracks(f"{s3_bucket_url}/music/metadata.jsonl")

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env["AWS_SECRET_ACCESS_KEY"])
    nowhere = f"http://127.0.0.1:{find_free_s3_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", nowhere)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", nowhere)
    with pytest.raises(StoreUnreachableError, match="cannot reach the S3 endpoint"):
        load_tracks(f"{s3_bucket_url}/music/metadata.jsonl")
    local = tmp_path / "m.jsonl"
    local.write_text('{"path": "a.wav", "caption": "x"}\n')
    with pytest.raises(StoreUnreachableError, match="s3://out"):  # before any Ray work starts
        prepare(_cfg(local, "s3://out/shards"))
