"""cluster/*.yaml, the Ray cluster launcher configs: valid against the JSON schema inside the ray
package (ray/autoscaler/ray-schema.json), and accepted by the launcher's own preparation
(`prepare_config` + `validate_config`, what `ray up` runs before it starts any node)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAMLS = sorted((REPO / "cluster").glob("*.yaml"))


def ray_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_both_launcher_configs_exist():
    providers = {yaml.safe_load(p.read_text())["provider"]["type"] for p in CLUSTER_YAMLS}
    assert {"local", "aws"} <= providers  # several nodes on one machine, and a GPU cloud


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_validates_against_rays_schema(path):
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, ray_schema())
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c.update(max_worker=2), "Additional properties are not allowed ('max_worker'"),
    (lambda c: c["provider"].pop("type"), "'type' is a required property"),
    (lambda c: c.update(head_start_ray_commands="ray start --head"), "is not of type 'array'"),
])
def test_rays_schema_rejects_broken_configs(mutate, expected):
    config = yaml.safe_load((REPO / "cluster/local.yaml").read_text())
    mutate(config)
    with pytest.raises(jsonschema.ValidationError) as err:
        jsonschema.validate(config, ray_schema())
    assert expected in str(err.value)


def test_gpu_node_types_are_bounded_and_known():
    config = yaml.safe_load((REPO / "cluster/gpu-aws.yaml").read_text())
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"] for t in workers)
    assert types[config["head_node_type"]]["resources"].get("CPU") == 0  # drivers only on the head
