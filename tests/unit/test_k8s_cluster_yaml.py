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


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_every_node_starts_with_the_clusters_token_not_the_home_default(path):
    """Each `ray start` sets RAY_AUTH_MODE=token and one RAY_AUTH_TOKEN_PATH (a head started
    without them turns token auth on from ~/.ray/auth_token, a worker does not: it is refused)."""
    import re
    import shlex

    config = yaml.safe_load(path.read_text())
    settings = set()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in config[key] if "ray start" in c]
        words = shlex.split(start.split(";")[-1])
        env = dict(w.split("=", 1) for w in words[:words.index("ray")] if re.fullmatch(r"[A-Z_]+=.*", w))
        assert env.get("RAY_AUTH_MODE") == "token", (key, start)
        settings.add(env.get("RAY_AUTH_TOKEN_PATH"))
    (token_path,) = settings
    assert token_path and token_path.startswith("$HOME/")
    remote = "~/" + token_path.removeprefix("$HOME/")
    written = any(remote in c and ">" in c for c in config["initialization_commands"])
    assert written or remote in config["file_mounts"], "every node must get the token file"
