"""The search's objectives: val_loss must be reportable before any trial starts, what a finished trial is
judged by, the winner, and the optional KAD audio objective on the tiny model."""

import io
import json
import math

import numpy as np
import pytest
import soundfile as sf
import yaml

from musiclora.config import ASHAConfig, AudioObjective, ConfigError, TrainConfig, TuneConfig
from musiclora.train.loop import latest_val
from musiclora.tune.objective import (
    audio_score,
    check_objective,
    pick_best,
    prompts_from_reference,
    trial_metrics,
)
from musiclora.tune.search import asha_schedule, load_tune_config

TRAIN = {"data": {"shards_url": "s3://b/s"}, "run": {"storage_path": "s3://b/r", "adapters_url": "s3://b/a"},
         "model": {"base": "tiny"}}


def _write(tmp_path, run=None, **tune):
    train = {**TRAIN, "run": {**TRAIN["run"], **(run or {})}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train))
    cfg = {"train_config": str(tmp_path / "train.yaml"), "search_space": {"adapter.r": {"choice": [4, 8]}}, **tune}
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "tune.yaml"


def test_default_objective_is_val_loss_and_needs_validation(tmp_path):
    assert TuneConfig.model_fields["metric"].default == "val_loss"
    with pytest.raises(ConfigError, match=r"val_loss needs validation: set run\.eval_every"):
        load_tune_config(_write(tmp_path))
    tune_cfg, _ = load_tune_config(_write(tmp_path, run={"eval_every": 4}))
    assert tune_cfg.metric == "val_loss"
    load_tune_config(_write(tmp_path, metric="loss"))  # the training loss needs no val split


@pytest.mark.parametrize("tune, match", [
    ({"metric": "accuracy"}, "metric"),  # not in every report: Tune's strict check would fail mid-search
    ({"select_by": "kad"}, "select_by: kad needs an audio_objective"),
    ({"asha": {"grace_period": 6}}, r"asha\.grace_period 6 is not a multiple of run\.eval_every 4"),
    ({"audio_objective": {"num_clips": 1}}, "num_clips"),
    ({"audio_objective": {"embedder": "vggish"}}, r"audio_objective\.embedder 'vggish': expected one of clap"),
    ({"audio_objective": {"embedder": "clap"}}, r"embedder clap needs audio_objective\.clap"),  # no random CLAP
])
def test_impossible_objectives_are_refused_before_any_trial(tmp_path, tune, match):
    with pytest.raises(ConfigError, match=match):
        load_tune_config(_write(tmp_path, run={"eval_every": 4}, **tune))


def test_asha_rungs_fall_on_validation_steps():
    cfg = TrainConfig.model_validate({**TRAIN, "optim": {"max_steps": 16, "warmup_steps": 5},
                                      "run": {**TRAIN["run"], "eval_every": 4, "log_every": 2}})
    grace, max_t = asha_schedule(ASHAConfig(), cfg, "val_loss")
    assert (grace, max_t) == (8, 17)
    rungs = [grace * 2 ** k for k in range(4) if grace * 2 ** k < max_t]
    assert rungs == [8, 16] and all(r % 4 == 0 for r in rungs)
    check_objective(TuneConfig.model_validate({"train_config": "t", "search_space": {}, "asha": {"grace_period": 8}}),
                    cfg)


def test_every_report_carries_the_latest_validation_with_its_step():
    state = {"val": [], "val_base": None}
    assert latest_val(state) == {}  # a run without validation reports no val_loss
    state["val_base"] = 5.5
    assert latest_val(state) == {"val_loss": 5.5, "val_step": 0}  # before the first eval_every pass
    state["val"] = [[4, 5.2], [8, 5.3]]
    assert latest_val(state) == {"val_loss": 5.3, "val_step": 8}


def test_a_finished_trial_is_judged_by_its_best_validation():
    summary = {"losses": [6.0, 5.0], "last_loss_mean": 5.1, "val_base": 5.5, "val": [[4, 5.2], [8, 5.3]],
               "best": {"step": 4, "val_loss": 5.2}}
    out = trial_metrics(summary)
    assert (out["val_loss"], out["val_step"], out["last_val_loss"], out["val_base"]) == (5.2, 4, 5.3, 5.5)
    only_base = trial_metrics({"losses": [6.0], "last_loss_mean": 6.0, "val_base": 5.5, "val": [], "best": None})
    assert (only_base["val_loss"], only_base["val_step"]) == (5.5, 0)
    assert "val_loss" not in trial_metrics({"losses": [6.0], "last_loss_mean": 6.0})


def test_winner_is_the_best_finished_trial_on_the_selected_objective():
    trials = [{"trial_id": "a", "status": "finished", "val_loss": 5.0, "kad": 9.0},
              {"trial_id": "b", "status": "finished", "val_loss": 5.2, "kad": 2.0},
              {"trial_id": "c", "status": "stopped", "val_loss": 4.0},  # ASHA cut it: no adapter
              {"trial_id": "d", "status": "finished", "val_loss": math.nan, "kad": 1.0},
              {"trial_id": "e", "status": "errored"}]
    assert pick_best(trials, "val_loss", "min")["trial_id"] == "a"
    assert pick_best(trials, "kad", "min")["trial_id"] == "d"
    assert pick_best(trials[2:3], "val_loss", "min") is None


# --------------------------------------------------------------------------- the audio objective

SR = 32000


def _val_shards(tmp_path, n: int = 3) -> str:
    """Shards of `n` 1 s validation segments of a real file, with distinct captions (as `prepare` writes them)."""
    from musiclora.data.shards import write_shard

    t = np.arange(int(4.0 * SR)) / SR
    tone = 0.3 * np.sin(2 * np.pi * (220 + 110 * (t > 2)) * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    sf.write(tmp_path / "track.wav", tone.astype(np.float32), SR)
    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 50), np.int16))
    samples = [{"__key__": f"t0_{i}", "codes.npy": buf.getvalue(),
                "json": {"caption": f"caption {i}", "source": str(tmp_path / "track.wav"), "start_s": float(i),
                         "duration_s": 1.0}} for i in range(n)]
    out = tmp_path / "shards"
    info = write_shard(str(out / "val-00000-000.tar"), samples)
    (out / "manifest.json").write_text(json.dumps({
        "num_samples": {"train": 0, "val": n},
        "shards": [{"name": "val-00000-000.tar", "split": "val", "num_samples": info["num_samples"]}]}))
    return str(out)


def test_prompts_are_the_validation_captions_with_their_audio_as_melody(tmp_path):
    from musiclora.eval.inputs import load_reference

    ref = load_reference(_val_shards(tmp_path), SR, clip_s=0.5, split="val")
    prompts = prompts_from_reference(ref, with_melody=True)
    assert [p.text for p in prompts] == ["caption 0", "caption 1", "caption 2"]
    assert [p.seed for p in prompts] == [0, 1, 2]
    for p, wav in zip(prompts, ref.wavs):
        assert p.melody is wav and p.melody_sample_rate == SR
    assert all(p.melody is None for p in prompts_from_reference(ref, with_melody=False))


def test_audio_score_is_kad_of_the_adapters_clips_against_the_validation_audio(tmp_path, tiny_musicgen_dir):
    import torch

    from musiclora.adapters import apply_lora, save_adapter
    from musiclora.config import AdapterConfig
    from musiclora.models.families import get_family

    family = get_family("musicgen-melody")
    assert family.takes_melody
    model = apply_lora(family.load(tiny_musicgen_dir).model, family, AdapterConfig(r=4))
    with torch.no_grad():  # a non-zero adapter, so the adapter's clips differ from the base's
        for name, p in family.lora_root(model).named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    adapter = save_adapter(family.lora_root(model), str(tmp_path / "adapter"),
                           card={"family": family.name, "base_model": tiny_musicgen_dir})
    objective = AudioObjective(embedder="mel-stats", num_clips=3, duration_s=0.5)
    shards = _val_shards(tmp_path)
    first = audio_score(adapter, shards, objective)
    assert first["kad_embedder"] == "mel-stats" and first["kad_clips"] == 3 and math.isfinite(first["kad"])
    assert audio_score(adapter, shards, objective) == first  # seeded: the same adapter gets the same score


def test_val_loss_on_shards_without_a_val_split_fails_before_ray_starts(tmp_path):
    import ray

    from musiclora.models.base import Loaded
    from musiclora.models.families import get_family
    from musiclora.train.trainer import PreflightError
    from musiclora.tune.search import run_tune

    family = get_family("musicgen-melody")
    spec = family.feature_spec(Loaded(family.skeleton("tiny"), None, "tiny", family.name))
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"family": family.name, "feature_spec": spec, "shards": [],
                                                      "num_samples": {"train": 64, "val": 0}}))
    train = {**TRAIN, "data": {"shards_url": f"file://{shards}"},
             "run": {"storage_path": f"file://{tmp_path}/runs", "adapters_url": f"file://{tmp_path}/a", "eval_every": 4}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train))
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump({"train_config": str(tmp_path / "train.yaml"),
                                                        "search_space": {"adapter.r": {"choice": [4]}},
                                                        "storage_path": f"file://{tmp_path}/tune"}))
    tune_cfg, base = load_tune_config(tmp_path / "tune.yaml")
    assert not ray.is_initialized()
    with pytest.raises(PreflightError, match="no 'val' split"):
        run_tune(tune_cfg, base)
    assert not ray.is_initialized()  # refused on the driver: no Ray, no trial, no worker


def test_dry_run_refuses_val_loss_when_the_prepare_config_holds_out_nothing():
    from pathlib import Path

    from musiclora.train.dryrun import dry_run_tune

    path = Path(__file__).resolve().parents[3] / "ray_jobs/configs/tune_musicgen_melody_tiny.yaml"
    ok_cfg, ok_base = load_tune_config(path)
    assert dry_run_tune(ok_cfg, ok_base, str(path), offline=True)["ok"]
    # the demo shards' prepare config (val_fraction 0) instead of the tune one's
    demo = ("train_overrides=[data.prepare_config=prepare_musicgen_melody_tiny.yaml, "
            "data.shards_url=s3://musiclora/shards/musicgen-melody/demo, run.eval_every=4]")
    tune_cfg, base = load_tune_config(path, [demo])
    report = dry_run_tune(tune_cfg, base, str(path), offline=True)
    assert not report["ok"] and any("val_fraction 0" in p for p in report["problems"]), report["problems"]


def test_audio_objective_needs_two_validation_samples():
    from musiclora.tune.objective import check_val_clips

    cfg = TuneConfig.model_validate({"train_config": "t", "search_space": {}, "audio_objective": {}})
    check_val_clips(cfg, {"num_samples": {"train": 8, "val": 2}})
    with pytest.raises(ValueError, match="'val' split has 1 sample"):
        check_val_clips(cfg, {"num_samples": {"train": 8, "val": 1}})
    check_val_clips(TuneConfig.model_validate({"train_config": "t", "search_space": {}}), {"num_samples": {}})


def test_audio_objective_of_a_gpu_search_runs_on_a_gpu():
    """The trial function reserves no CPU or GPU: a GPU search scores its audio in a task holding one."""
    from musiclora.tune.objective import audio_task_resources

    cfg = TrainConfig.model_validate({**TRAIN, "run": {**TRAIN["run"], "use_gpu": True, "cpus_per_worker": 4}})
    assert audio_task_resources(cfg) == {"num_gpus": 1, "num_cpus": 4}
