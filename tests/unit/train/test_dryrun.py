"""`--dry-run` (issue 13): every shipped config checks out offline, from real-size skeletons on
the meta device (never weights), and the pairs of configs refer to each other correctly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from musiclora import k8s
from musiclora.config import PrepareConfig, TrainConfig, load_config
from musiclora.train.dryrun import dry_run_prepare, dry_run_train, dry_run_tune
from musiclora.tune.search import load_tune_config

REPO = Path(__file__).resolve().parents[3]
CONFIGS = sorted((REPO / "ray_jobs" / "configs").glob("*.yaml"))


def _kind(path: Path) -> str:
    tree = yaml.safe_load(path.read_text())
    return "tune" if "search_space" in tree else "prepare" if "output_url" in tree else "train"


def _dry_run(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    kind = _kind(path)
    if kind == "tune":
        tune_cfg, base = load_tune_config(path, list(overrides))
        return dry_run_tune(tune_cfg, base, str(path), offline=True)
    if kind == "prepare":
        return dry_run_prepare(load_config(path, list(overrides), PrepareConfig), str(path), offline=True)
    return dry_run_train(load_config(path, list(overrides), TrainConfig), str(path), offline=True)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_dry_runs_offline(path):
    report = _dry_run(path)
    assert report["ok"], report["problems"]
    assert report["model_params"] > 0 and report["feature_spec"]["family"] in path.name.replace("_", "-")


def test_real_size_configs_use_real_size_models_and_agree():
    train = _dry_run(REPO / "ray_jobs/configs/musicgen_melody.yaml")
    assert 1.5e9 < train["model_params"] < 1.6e9  # facebook/musicgen-melody: 1.5 B (decoder 1.38 B)
    assert train["resources"]["GPU"] == 8 and train["dtype"] == "bfloat16"
    assert any("checked against the prepare config" in n for n in train["notes"])
    prep = _dry_run(REPO / "ray_jobs/configs/prepare_musicgen_melody.yaml")
    assert prep["feature_spec"] == train["feature_spec"]
    assert prep["resources"]["GPU"] == 8 and prep["resources"]["encode_precision"] == "bf16"  # 8 GPU encoder actors
    audioldm = _dry_run(REPO / "ray_jobs/configs/audioldm.yaml")
    assert 2.3e8 < audioldm["model_params"] < 2.5e8  # UNet 185 M + VAE 55 M (skeleton: no CLAP/vocoder)
    for name, seconds in (("prepare_musicgen_melody.yaml", 30.0), ("prepare_audioldm.yaml", 10.24)):
        cfg = load_config(REPO / "ray_jobs/configs" / name, [], PrepareConfig)
        assert cfg.segment_s == seconds and cfg.val_fraction > 0, name  # as each model was trained; a val split
    tune = _dry_run(REPO / "ray_jobs/configs/tune_musicgen_melody.yaml")
    assert tune["resources"]["GPU"] == 8  # 4 concurrent trials x 2 GPUs: the 8 of cluster/gpu-aws.yaml
    aws = yaml.safe_load((REPO / "cluster/gpu-aws.yaml").read_text())
    assert aws["available_node_types"]["gpu-worker"]["max_workers"] >= tune["resources"]["GPU"]
    assert "--env DS_ACCELERATOR=cuda" in aws["docker"]["worker_run_options"]


@pytest.mark.parametrize("job", [*k8s.JOBS, *k8s.GPU_JOBS], ids=lambda j: j.config.rsplit("/", 1)[-1])
def test_k8s_jobs_dry_run_with_their_overrides(job):
    report = _dry_run(REPO / job.config, job.overrides)
    assert report["ok"], report["problems"]


@pytest.mark.parametrize("jobs", [k8s.JOBS, k8s.GPU_JOBS], ids=["base", "gpu"])
def test_k8s_train_and_tune_jobs_read_the_shards_the_prepare_job_writes(jobs):
    """A job set runs in one namespace: its train and tune jobs must find the prepare job's shards,
    with the val split the tune objective needs."""
    prepare = next(j for j in jobs if j.name == "prepare")
    made = load_config(REPO / prepare.config, list(prepare.overrides), PrepareConfig)
    assert made.val_fraction > 0, prepare.config
    for job in jobs:
        if job.name == "train":
            cfg = load_config(REPO / job.config, list(job.overrides), TrainConfig)
            assert cfg.data.shards_url == made.output_url, job.config
        elif job.name == "tune":
            _, base = load_tune_config(REPO / job.config, list(job.overrides))
            assert base["data"]["shards_url"] == made.output_url, job.config


def _write(tmp_path: Path, name: str, tree: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture
def real_pair(tmp_path):
    train = yaml.safe_load((REPO / "ray_jobs/configs/musicgen_melody.yaml").read_text())
    prep = yaml.safe_load((REPO / "ray_jobs/configs/prepare_musicgen_melody.yaml").read_text())
    return tmp_path, train, prep


def test_validation_without_a_val_split_is_refused_before_the_shards_exist(real_pair):
    """The shipped state before issue 13: eval_every 250 against a prepare config with val_fraction 0."""
    tmp_path, train, prep = real_pair
    prep["val_fraction"] = 0.0
    _write(tmp_path, "prepare.yaml", prep)
    train["data"]["prepare_config"] = "prepare.yaml"
    report = dry_run_train(TrainConfig.model_validate(train), str(_write(tmp_path, "train.yaml", train)), offline=True)
    assert not report["ok"] and any("val_fraction 0" in p for p in report["problems"])


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("output_url", "s3://elsewhere/shards", "not data.shards_url"),
    ("base", "tiny", "not the trained"),
])
def test_a_prepare_config_that_makes_other_shards_is_refused(real_pair, key, value, expected):
    tmp_path, train, prep = real_pair
    prep[key] = value
    _write(tmp_path, "prepare.yaml", prep)
    train["data"]["prepare_config"] = "prepare.yaml"
    report = dry_run_train(TrainConfig.model_validate(train), str(_write(tmp_path, "train.yaml", train)), offline=True)
    assert not report["ok"] and any(expected in p for p in report["problems"]), report["problems"]


def test_unpaired_shards_that_cannot_be_read_are_a_problem(real_pair):
    _, train, _ = real_pair
    train["data"].pop("prepare_config")
    report = dry_run_train(TrainConfig.model_validate(train), None, offline=True)
    assert any("data.prepare_config is unset" in p for p in report["problems"])


def test_adapter_targets_are_checked_on_the_real_skeleton(real_pair):
    _, train, _ = real_pair
    train["adapter"]["target_modules"] = ["no_such_proj"]
    report = dry_run_train(TrainConfig.model_validate(train), str(REPO / "ray_jobs/configs/musicgen_melody.yaml"),
                           offline=True)
    assert any("no_such_proj" in p for p in report["problems"])


def test_cli_dry_run_exit_codes(real_pair):
    from musiclora.cli.main import app

    tmp_path, train, prep = real_pair
    runner = CliRunner()
    ok = runner.invoke(app, ["train", "--config", str(REPO / "ray_jobs/configs/musicgen_melody.yaml"), "--dry-run",
                             "--offline"])
    assert ok.exit_code == 0, ok.output
    prep["val_fraction"] = 0.0
    _write(tmp_path, "prepare.yaml", prep)
    train["data"]["prepare_config"] = "prepare.yaml"
    bad = runner.invoke(app, ["train", "--config", str(_write(tmp_path, "train.yaml", train)), "--dry-run", "--offline"])
    assert bad.exit_code == 1 and '"ok": false' in bad.output
    for cmd, name in ((["prepare"], "prepare_audioldm.yaml"), (["tune", "run"], "tune_musicgen_melody.yaml")):
        res = runner.invoke(app, [*cmd, "--config", str(REPO / "ray_jobs/configs" / name), "--dry-run", "--offline"])
        assert res.exit_code == 0, res.output


@pytest.mark.parametrize(("script", "config"), [("train.py", "audioldm.yaml"), ("prepare.py", "prepare_musicgen_melody.yaml"),
                                                ("tune.py", "tune_musicgen_melody_tiny.yaml")])
def test_ray_job_entry_points_dry_run(script, config):
    """`ray job submit -- python ray_jobs/<script> --config ... --dry-run` checks and exits, no Ray started."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(REPO / "ray_jobs" / script), "--config",
                           str(REPO / "ray_jobs/configs" / config), "--dry-run", "--offline"],
                          check=False, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["ok"] and report["kind"] == script.removesuffix(".py")
