"""Config schemas: overrides, validation messages that name the key."""

import pytest

from musiclora.config import ConfigError, PrepareConfig, TrainConfig, load_config, parse_overrides

MIN = """
data: {shards_url: s3://b/shards}
run: {storage_path: s3://b/runs, adapters_url: s3://b/adapters}
"""


def _write(tmp_path, text=MIN):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_overrides_are_typed_and_applied(tmp_path):
    cfg = load_config(_write(tmp_path), ["adapter.r=16", "optim.lr=0.0005", "deepspeed.zero_stage=3"])
    assert cfg.adapter.r == 16 and cfg.optim.lr == 0.0005 and cfg.deepspeed.zero_stage == 3
    assert parse_overrides(["adapter.target_modules=[q_proj, v_proj]"]) == {
        "adapter.target_modules": ["q_proj", "v_proj"]
    }


def test_defaults_are_the_seed_study_lora_values(tmp_path):
    a = load_config(_write(tmp_path)).adapter
    assert (a.r, a.lora_alpha, a.lora_dropout, a.preset) == (8, 16.0, 0.25, "attn")


@pytest.mark.parametrize(
    "override, key",
    [("adapter.r=0", "adapter.r"), ("adapter.lora_dropout=1.0", "adapter.lora_dropout"),
     ("model.family=jukebox", "model.family"), ("deepspeed.zero_stage=1", "deepspeed.zero_stage"),
     ("adapter.rank=4", "adapter.rank")],
)
def test_invalid_values_name_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(_write(tmp_path), [override])


def test_missing_section_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="data"):
        load_config(_write(tmp_path, "run: {storage_path: x, adapters_url: y}"))
    with pytest.raises(ConfigError, match="key=value"):
        load_config(_write(tmp_path), ["adapter.r"])


def test_train_config_round_trips_through_a_dict(tmp_path):
    cfg = load_config(_write(tmp_path), ["run.name=x"])
    assert TrainConfig.model_validate(cfg.model_dump()) == cfg


def test_prepare_config_rejects_unknown_family():
    with pytest.raises(ValueError, match="unknown model family"):
        PrepareConfig(family="nope", metadata="m.jsonl", output_url="s3://b/x")
