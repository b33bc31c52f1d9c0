"""`prepare` without Ray: one track's segments and augmentation, the encode step on the tiny
MusicGen-Melody, the shard plan, the manifest."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import soundfile as sf

from musiclora.config import PrepareConfig
from musiclora.data.augment import Augmentation, apply_augmentation, draw_augmentations
from musiclora.data.prepare import EncodeTask, build_manifest, plan_shards, shard_name, track_segments
from musiclora.data.shards import ShardStream, records_to_shard, sample_record

SR = 32_000


def tone(freq: float, seconds: float, sr: int = SR, amp: float = 0.4) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t) + 0.1 * amp * np.sin(2 * np.pi * 2 * freq * t)).astype(np.float32)


def peak_hz(x: np.ndarray, sr: int = SR) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[spec.argmax()])


def cfg(tmp_path, **kw) -> PrepareConfig:
    base = {"base": "tiny", "metadata": str(tmp_path / "m.jsonl"), "output_url": str(tmp_path / "out"),
            "segment_s": 2.0, "min_s": 1.0, "samples_per_shard": 4}
    return PrepareConfig(**{**base, **kw})


def track(path, index=0, **kw) -> dict:
    return {"path": str(path), "caption": "a test tone in A major, 100 BPM", "index": index, "split": "train", **kw}


# --------------------------------------------------------------------------- one track


def test_track_segments_cut_trimmed_normalised_audio(tmp_path):
    x = np.concatenate([np.zeros(SR), tone(440, 5.5, 44100)[: int(5.5 * 44100)], np.zeros(SR)])
    sf.write(tmp_path / "a.wav", np.stack([x, x], 1), 44100)
    segs, input_s = track_segments(track(tmp_path / "a.wav", 7), cfg(tmp_path), SR)
    assert input_s == pytest.approx(len(x) / 44100)
    assert [s.key for s in segs] == ["t000007_0_000000000", "t000007_0_000002000", "t000007_0_000004000"]
    assert [round(s.num_valid / SR, 1) for s in segs] == [2.0, 2.0, 1.5]  # silence trimmed, 1.5 s tail kept
    assert all(s.audio.shape == (2 * SR,) and s.audio.dtype == np.float32 for s in segs)
    assert segs[0].meta["source"].endswith("a.wav") and segs[2].meta["start_s"] == pytest.approx(4.0, abs=0.05)
    assert np.abs(segs[0].audio).max() <= 10 ** (-1 / 20) + 1e-4  # loudness-normalised under the -1 dBFS ceiling


def test_paired_melody_keeps_the_untrimmed_file_time(tmp_path):
    """A stem in `melody_path` is read over the segment's window in the original file's time."""
    x = np.concatenate([np.zeros(SR), tone(440, 4.0)])  # 1 s of leading silence is trimmed away
    sf.write(tmp_path / "a.wav", x, SR)
    segs, _ = track_segments(track(tmp_path / "a.wav", melody_path=str(tmp_path / "hum.wav")),
                             cfg(tmp_path, augment_copies=1, pitch_shift_semitones=2), SR)
    plain = [s for s in segs if "augmentation" not in s.meta]
    shifted = [s for s in segs if "augmentation" in s.meta]
    assert plain and shifted
    assert [s.meta["melody_path"] for s in plain] == [str(tmp_path / "hum.wav")] * len(plain)
    assert plain[1].meta["source_start_s"] == pytest.approx(plain[1].meta["start_s"] + 1.0, abs=0.05)
    assert all("melody_path" not in s.meta for s in shifted)  # a re-pitched copy conditions on its own mix


SR_SAO = 44_100  # Stable Audio Open: 44.1 kHz stereo


def test_stereo_family_segments_keep_left_and_right(tmp_path):
    """channels=2: segments are [2, N]; a stereo source keeps its L/R difference (also in augmented
    copies), a mono source is dual mono; the default (1) still mixes down to [N]."""
    lr = np.stack([tone(440, 4.5, SR_SAO), tone(660, 4.5, SR_SAO)])
    sf.write(tmp_path / "lr.wav", np.concatenate([np.zeros((2, SR_SAO // 2)), lr], 1).T, SR_SAO)
    sf.write(tmp_path / "mono.wav", tone(440, 4.5, SR_SAO), SR_SAO)
    c = cfg(tmp_path, augment_copies=1, pitch_shift_semitones=2)
    segs, _ = track_segments(track(tmp_path / "lr.wav", key="A major"), c, SR_SAO, channels=2)
    assert len(segs) == 4 and all(s.audio.shape == (2, 2 * SR_SAO) and s.audio.dtype == np.float32 for s in segs)
    for s in segs:
        ratio = 2 ** (s.meta["augmentation"]["semitones"] / 12) if "augmentation" in s.meta else 1.0
        left, right = (peak_hz(ch[: s.num_valid], SR_SAO) for ch in s.audio)
        assert left == pytest.approx(440 * ratio, rel=0.02) and right == pytest.approx(660 * ratio, rel=0.02)
    dual, _ = track_segments(track(tmp_path / "mono.wav"), cfg(tmp_path), SR_SAO, channels=2)
    assert all(s.audio.shape == (2, 2 * SR_SAO) and np.array_equal(s.audio[0], s.audio[1]) for s in dual)
    mixed, _ = track_segments(track(tmp_path / "lr.wav"), cfg(tmp_path), SR_SAO)
    assert all(s.audio.shape == (2 * SR_SAO,) for s in mixed)


def test_stable_audio_prepare_encodes_stereo(tmp_path):
    """`EncodeTask` cuts segments with the family's `channels`: for Stable Audio Open, swapping left
    and right changes the latents (a mono downmix would give the same latents for both)."""
    lr = np.stack([tone(440, 2.5, SR_SAO), tone(660, 2.5, SR_SAO)])
    sf.write(tmp_path / "lr.wav", lr.T, SR_SAO)
    sf.write(tmp_path / "rl.wav", lr[::-1].T, SR_SAO)
    task = EncodeTask(cfg(tmp_path, family="stable-audio-open").model_dump())
    assert task.family.channels == 2
    latents = []
    for name in ("lr.wav", "rl.wav"):
        rows = [r for r in task.encode_track(track(tmp_path / name)) if r["kind"] == "sample"]
        (tmp_path / "s.tar").write_bytes(records_to_shard([r["record"] for r in rows]))
        latents.append([d["latents.npy"] for d in ShardStream([str(tmp_path / "s.tar")], num_samples=[len(rows)])])
    assert len(latents[0]) == 1 and latents[0][0].shape == latents[1][0].shape
    assert not np.allclose(latents[0][0], latents[1][0], atol=1e-3)


def test_bad_tracks_raise_with_a_reason(tmp_path):
    from musiclora.audio import AudioDecodeError

    sf.write(tmp_path / "silent.wav", np.zeros(3 * SR, np.float32), SR)
    sf.write(tmp_path / "short.wav", tone(440, 0.5), SR)
    (tmp_path / "junk.wav").write_bytes(b"RIFF....WAVEjunk" * 10)
    with pytest.raises(ValueError, match="silent"):
        track_segments(track(tmp_path / "silent.wav"), cfg(tmp_path), SR)
    with pytest.raises(ValueError, match="too short"):
        track_segments(track(tmp_path / "short.wav"), cfg(tmp_path), SR)
    with pytest.raises(AudioDecodeError, match="junk.wav"):
        track_segments(track(tmp_path / "junk.wav"), cfg(tmp_path), SR)
    with pytest.raises(FileNotFoundError, match="nothere.wav"):
        track_segments(track(tmp_path / "nothere.wav"), cfg(tmp_path), SR)


def test_augmented_copies_shift_pitch_and_retune_the_caption(tmp_path):
    sf.write(tmp_path / "a.wav", tone(440, 4.0), SR)
    c = cfg(tmp_path, augment_copies=2, pitch_shift_semitones=3, time_stretch=0.2, noise_snr_db=20.0)
    segs, _ = track_segments(track(tmp_path / "a.wav", key="A major", bpm=100.0), c, SR)
    originals = [s for s in segs if "augmentation" not in s.meta]
    copies = [s for s in segs if "augmentation" in s.meta]
    assert len(originals) == 2 and copies and {s.key.split("_")[1] for s in copies} == {"1", "2"}
    for s in copies:
        aug = s.meta["augmentation"]
        expected_hz = 440 * 2 ** (aug["semitones"] / 12)
        assert peak_hz(s.audio[: s.num_valid]) == pytest.approx(expected_hz, rel=0.02)
        assert s.meta["bpm"] == pytest.approx(100 * aug["rate"], abs=0.1)
        assert f"in {s.meta['key']}" in s.caption and s.meta["key"] != "A major"
    again, _ = track_segments(track(tmp_path / "a.wav", key="A major", bpm=100.0), c, SR)
    assert all(np.array_equal(a.audio, b.audio) for a, b in zip(segs, again, strict=True))  # reproducible


def test_draw_augmentations_is_seeded_and_validated():
    a = draw_augmentations("x.wav", 3, seed=1, pitch_shift_semitones=2, time_stretch=0.1, noise_snr_db=10)
    assert a == draw_augmentations("x.wav", 3, seed=1, pitch_shift_semitones=2, time_stretch=0.1, noise_snr_db=10)
    assert a != draw_augmentations("y.wav", 3, seed=1, pitch_shift_semitones=2, time_stretch=0.1, noise_snr_db=10)
    assert a[0].is_identity and all(x.semitones in (-2, -1, 1, 2) and 0.9 <= x.rate <= 1.1 for x in a[1:])
    with pytest.raises(ValueError, match="enable at least one"):
        draw_augmentations("x.wav", 1)


def test_noise_is_added_at_the_requested_snr():
    x = tone(440, 2.0)
    y = apply_augmentation(x, SR, Augmentation(copy=1, noise_snr_db=20.0))
    noise = y - x
    snr = 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / np.mean(noise.astype(np.float64) ** 2))
    assert snr == pytest.approx(20.0, abs=0.3)
    stretched = apply_augmentation(x, SR, Augmentation(copy=1, rate=1.25))
    assert len(stretched) == pytest.approx(len(x) / 1.25, rel=0.01)


# --------------------------------------------------------------------------- encoding


def test_encode_task_on_the_tiny_model_gives_readable_shard_records(tmp_path):
    sf.write(tmp_path / "a.wav", tone(330, 5.0), SR)
    (tmp_path / "bad.flac").write_bytes(b"")
    task = EncodeTask(cfg(tmp_path).model_dump())
    rows = task.encode_track(track(tmp_path / "a.wav", 3))
    samples = [r for r in rows if r["kind"] == "sample"]
    assert [r["kind"] for r in rows] == ["sample"] * 3 + ["track"]
    assert [r["order"] for r in samples] == [0, 1, 2] and all(r["nbytes"] == len(r["record"]) for r in samples)
    (tmp_path / "s.tar").write_bytes(records_to_shard([r["record"] for r in samples]))
    decoded = list(ShardStream([str(tmp_path / "s.tar")], num_samples=[3]))
    assert [d["__key__"] for d in decoded] == [r["key"] for r in samples]
    assert decoded[0]["codes.npy"].shape == (4, 100) and decoded[0]["chroma.npy"].shape == (16, 12)
    assert decoded[0]["json"]["caption"] == "a test tone in A major, 100 BPM"
    assert task.encode_track(track(tmp_path / "a.wav", 3))[0]["record"] == samples[0]["record"]  # deterministic
    (skip,) = task.encode_track(track(tmp_path / "bad.flac", 4))
    assert skip["kind"] == "skip" and "empty" in skip["reason"] and skip["path"].endswith("bad.flac")


# --------------------------------------------------------------------------- the plan and the manifest


def _facts(spec):
    return [{"kind": "sample", "split": sp, "track": t, "order": o, "nbytes": n} for sp, t, o, n in spec]


def test_plan_cuts_by_count_and_size_in_a_fixed_order():
    facts = _facts([("train", t, o, 100) for t in range(3) for o in range(3)] + [("val", 9, 0, 100)])
    starts = plan_shards(facts, samples_per_shard=4)
    assert starts == {"train": [(0, 0), (1, 1), (2, 2)], "val": [(9, 0)]}
    assert plan_shards(list(reversed(facts)), 4) == starts  # independent of arrival order
    by_size = plan_shards(facts, samples_per_shard=100, target_bytes=1024 + 250)
    assert by_size["train"] == [(0, 0), (0, 2), (1, 1), (2, 0), (2, 2)]  # 2 samples of 100 B fit, 3 do not
    huge = plan_shards(_facts([("train", 0, 0, 5000), ("train", 0, 1, 10)]), 10, target_bytes=2000)
    assert huge["train"] == [(0, 0), (0, 1)]  # an oversized sample still gets its own shard
    assert shard_name("train", 3) == "train-00003.tar"


def test_manifest_lists_skips_and_counts(tmp_path):
    facts = [
        {"kind": "track", "path": "a.wav", "seconds": 10.0, "spec": '{"codec": "encodec"}', "reason": ""},
        {"kind": "skip", "path": "b.wav", "seconds": 0.0, "spec": "", "reason": "AudioDecodeError: empty"},
        {"kind": "sample", "path": "a.wav", "seconds": 2.0, "spec": "", "reason": ""},
    ]
    shards = [{"name": "train-00000.tar", "split": "train", "num_samples": 1, "num_bytes": 2048, "sha256": "ab"}]
    m = build_manifest(cfg(tmp_path), "musicgen-melody", facts, [{"path": "m.jsonl", "reason": "line 2 ..."}],
                       shards, wall_s=4.0)  # fmt: skip
    assert m["num_tracks"] == 1 and m["num_skipped"] == 2 and [s["path"] for s in m["skipped"]] == ["b.wav", "m.jsonl"]
    assert m["num_samples"] == {"train": 1, "val": 0} and m["audio_seconds"] == 2.0
    assert m["throughput"]["input_audio_s_per_s"] == 2.5 and m["feature_spec"] == {"codec": "encodec"}


# --------------------------------------------------------------------------- streaming writer and encoder actors


def test_streaming_cut_writes_the_shards_the_plan_names(tmp_path):
    """Records streamed in (track, order) order land in exactly the shards `plan_shards` names,
    each written as a readable tar as soon as it closes."""
    from musiclora.data.prepare import StreamingShards

    keys = [("train", t, o) for t in range(4) for o in range(3)] + [("val", 7, 0)]
    records = {k: sample_record({"__key__": f"t{k[1]}_{k[2]}", "bin": b"x" * (100 + 700 * ((k[1] + k[2]) % 3))})
               for k in keys}
    plan = plan_shards(_facts([(*k, len(r)) for k, r in records.items()]), samples_per_shard=3, target_bytes=4200)
    assert len(plan["train"]) > 4  # both the count and the size cap cut
    writer = StreamingShards(3, 4200, str(tmp_path), threads=2)
    for split, t, o in sorted(keys, key=lambda k: (k[1], k[2])):  # arrival: track order, splits interleaved
        writer.add(split, t, o, records[(split, t, o)])
    shards = writer.finish()
    assert sorted(s["name"] for s in shards) == sorted(shard_name(sp, i) for sp, v in plan.items() for i in range(len(v)))
    for s in shards:
        data = (tmp_path / s["name"]).read_bytes()
        assert len(data) == s["num_bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
    first = [d["__key__"] for d in ShardStream([str(tmp_path / "train-00001.tar")], num_samples=[1])][:1]
    assert first == ["t{}_{}".format(*plan["train"][1])]


def test_encoder_actors_take_gpus_and_bf16_only_when_configured(tmp_path):
    import torch

    from musiclora.data.prepare import encoder_device, encoder_resources

    cpu = cfg(tmp_path)
    assert encoder_resources(cpu) == {"num_cpus": 1.0} and encoder_device(cpu) == (torch.device("cpu"), torch.float32)
    gpu = cpu.model_copy(update={"encoder_gpus": 0.5, "encoder_cpus": 4, "encode_precision": "bf16"})
    assert encoder_resources(gpu) == {"num_cpus": 4, "num_gpus": 0.5}
    expected = (torch.device("cuda"), torch.bfloat16) if torch.cuda.is_available() else (torch.device("cpu"), torch.float32)
    assert encoder_device(gpu) == expected


@pytest.mark.parametrize("family", ["musicgen-melody", "audioldm"])
def test_encode_segments_run_with_the_encoder_on_another_device(family, monkeypatch):
    """A GPU encoder actor: the family moves the audio to the encoder's device and returns CPU
    features. The encoder sits on `meta` here, so a CPU input fails and a CPU `.numpy()` of a
    device tensor fails too; only the tensor plumbing is checked (meta holds no values)."""
    import numpy as np
    import torch

    from musiclora.models.base import Segment
    from musiclora.models.families import get_family

    fam = get_family(family)
    loaded = fam.load("tiny")
    loaded.model.to("meta")  # as an actor's `.to(device)`
    codec = loaded.model.audio_encoder if family == "musicgen-melody" else loaded.model.vae
    seen = []

    def spy(module, args, kwargs):
        seen.extend(a.device.type for a in (*args, *kwargs.values()) if torch.is_tensor(a))

    codec.encoder.register_forward_pre_hook(spy, with_kwargs=True)
    seg = Segment("k", np.zeros(fam.sample_rate, np.float32), fam.sample_rate, "a tone")
    with pytest.raises((NotImplementedError, RuntimeError)):  # meta has no values to copy back
        fam.encode_segments(loaded, [seg])
    assert seen and set(seen) == {"meta"}


def test_written_shards_carry_member_offsets_the_indexed_reader_seeks_with(tmp_path):
    """`_write_group` -> `build_manifest` records offsets and keys; `ShardIndex` reads any member by them."""
    import json as _json

    from musiclora.data.indexed import ShardIndex
    from musiclora.data.prepare import _write_group

    sf.write(tmp_path / "a.wav", tone(330, 5.0), SR)
    rows = [r for r in EncodeTask(cfg(tmp_path).model_dump()).encode_track(track(tmp_path / "a.wav", 3))
            if r["kind"] == "sample"]
    group = {"shard": np.asarray(["train-00000.tar"] * 3), "track": np.asarray([3, 3, 3]),
             "order": np.asarray([2, 0, 1]), "record": np.array([rows[i]["record"] for i in (2, 0, 1)], dtype=object)}
    out = tmp_path / "out"
    out.mkdir()
    written = _write_group(group, str(out))
    row = {k: v[0] for k, v in written.items()}
    manifest = build_manifest(cfg(tmp_path), "musicgen-melody", [], [], [row], 1.0)
    (shard,) = manifest["shards"]
    assert shard["keys"] == [r["key"] for r in rows] and len(shard["offsets"]) == 4
    assert shard["offsets"][-1] + 1024 == shard["num_bytes"]
    (out / "manifest.json").write_text(_json.dumps(manifest))
    got = ShardIndex(str(out)).read([2, 0])
    assert [g["__key__"] for g in got] == [rows[2]["key"], rows[0]["key"]]
