"""Tune search spaces are validated value by value before any trial starts."""

import pytest
import yaml

from musiclora.config import ConfigError
from musiclora.tune.search import load_tune_config, param_space, trial_config

TRAIN = {"data": {"shards_url": "s3://b/s"}, "run": {"storage_path": "s3://b/r", "adapters_url": "s3://b/a", "eval_every": 4},
         "model": {"base": "tiny"}}


def _write(tmp_path, space, **extra):
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(TRAIN))
    cfg = {"train_config": str(tmp_path / "train.yaml"), "search_space": space, **extra}
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "tune.yaml"


def test_valid_space_gives_tune_domains_and_trial_configs(tmp_path):
    tune_cfg, base = load_tune_config(_write(tmp_path, {
        "adapter.r": {"choice": [4, 8]}, "adapter.lora_dropout": {"uniform": [0.0, 0.3]},
        "optim.lr": {"loguniform": [1e-4, 1e-2]}, "adapter.preset": {"choice": ["attn", "attn+ffn"]}}))
    space = param_space(tune_cfg)
    assert set(space) == {"adapter.r", "adapter.lora_dropout", "optim.lr", "adapter.preset"}
    cfg = trial_config(base, {"adapter.r": 4, "adapter.lora_dropout": 0.1, "optim.lr": 1e-3,
                              "adapter.preset": "attn+ffn"}, "t-1")
    assert (cfg.adapter.r, cfg.adapter.preset, cfg.run.name) == (4, "attn+ffn", "t-1")


@pytest.mark.parametrize("space, key", [
    ({"adapter.r": {"choice": [0, 8]}}, "adapter.r"),
    ({"adapter.lora_dropout": {"uniform": [0.0, 1.0]}}, "adapter.lora_dropout"),
    ({"adapter.preset": {"choice": ["attn", "everything"]}}, "adapter.preset"),
    ({"adapter.rank": {"choice": [4]}}, "adapter.rank"),
    ({"optim.lr": {"loguniform": [0.0, 0.1]}}, "optim.lr"),
    ({"adapter.r": {"choice": [4], "uniform": [1, 2]}}, "adapter.r"),
])
def test_impossible_values_are_rejected_naming_the_key(tmp_path, space, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_tune_config(_write(tmp_path, space))


def test_unknown_tune_field_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="num_trials"):
        load_tune_config(_write(tmp_path, {"adapter.r": {"choice": [4]}}, num_trials=3))
