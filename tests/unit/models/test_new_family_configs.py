"""The shipped AudioLDM2 / Stable Audio Open configs (tiny and real size, prepare and train) validate,
name their family's presets, and the tiny ones resolve LoRA targets on the tiny model."""

from pathlib import Path

import pytest

from musiclora.adapters import check_targets
from musiclora.config import PrepareConfig, TrainConfig, load_config
from musiclora.models.families import get_family

CONFIGS = Path(__file__).resolve().parents[3] / "ray_jobs" / "configs"
TRAIN = ["audioldm2_tiny", "audioldm2", "stable_audio_open_tiny", "stable_audio_open"]
PREPARE = ["prepare_audioldm2_tiny", "prepare_audioldm2", "prepare_stable_audio_open_tiny", "prepare_stable_audio_open"]


@pytest.mark.parametrize("name", TRAIN)
def test_train_configs_validate_and_name_a_preset(name):
    cfg = load_config(CONFIGS / f"{name}.yaml", [], TrainConfig)
    family = get_family(cfg.model.family).configure(cfg.model.options)
    assert family.target_modules(cfg.adapter.preset)
    assert (cfg.model.base == "tiny") == name.endswith("_tiny")
    assert cfg.deepspeed.zero_stage == 2
    if cfg.model.base == "tiny":
        assert check_targets(family.lora_root(family.skeleton("tiny")), family, cfg.adapter)
    else:
        assert cfg.model.base == family.default_base and cfg.deepspeed.precision == "bf16"


@pytest.mark.parametrize("name", PREPARE)
def test_prepare_configs_validate_and_fit_the_model_window(name):
    cfg = load_config(CONFIGS / f"{name}.yaml", [], PrepareConfig)
    family = get_family(cfg.family)
    if cfg.base != "tiny":
        assert cfg.base == family.default_base and cfg.segment_s == pytest.approx(family.default_segment_s)
    if cfg.family == "stable-audio-open":
        skel = family.skeleton("tiny")
        window_s = skel.transformer.config.sample_size * skel.hop_length / family.sample_rate
        assert cfg.base != "tiny" or cfg.segment_s <= window_s


@pytest.mark.parametrize("name", ["tune_audioldm2_tiny", "tune_stable_audio_open_tiny"])
def test_tune_configs_dry_run(name):
    """The Tune search's dry run: every candidate value validates, the space builds, a trial config follows."""
    from musiclora.tune.search import load_tune_config, param_space, trial_config

    tune_cfg, base = load_tune_config(CONFIGS / f"{name}.yaml")
    space = param_space(tune_cfg)
    assert "adapter.preset" in space
    trial = trial_config(base, {"adapter.r": 4, "adapter.preset": "attn", "optim.lr": 0.001}, "t0")
    assert trial.adapter.r == 4 and trial.run.name == "t0" and trial.optim.max_steps == 16
    assert get_family(trial.model.family).target_modules(trial.adapter.preset)


def test_config_and_family_tables_name_the_same_families():
    from musiclora.config import FAMILIES as CONFIG_FAMILIES
    from musiclora.models.families import FAMILIES

    assert set(CONFIG_FAMILIES) == set(FAMILIES) >= {"audioldm2", "stable-audio-open"}
