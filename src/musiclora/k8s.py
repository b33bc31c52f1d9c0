"""KubeRay manifests built from the project's own config, so the two cannot drift apart.

`musiclora k8s render` writes `k8s/base/` (a RayCluster for interactive work, RayJobs for
prepare / train / tune, a RayService for serving) and the generated patches of the `gpu`
overlay. What the manifests repeat from the project comes from its source of truth here:

| in the manifests                 | taken from                                                    |
|----------------------------------|---------------------------------------------------------------|
| image tag `musiclora:<version>`  | `version` in pyproject.toml                                   |
| `rayVersion`                     | the `ray==` pin in constraints/cpu.txt                        |
| RayJob `entrypoint`              | the script named in the first line of each ray_jobs/configs/*.yaml (`# ray job submit ... -- python ray_jobs/X.py --config ...`) + the job's k8s overrides below |
| RayService `serveConfigV2`       | serve/config.yaml, with the k8s settings of `SERVE_K8S` merged |

Hand-written and checked by tests instead: the overlays' kustomizations and resource patches,
the Dockerfile (its WORKDIR is `APP_DIR`, its Ray base image the pinned Ray) and cluster/.

Object storage: every Ray container reads the ConfigMap `musiclora-storage` (endpoint, region)
and the Secret `musiclora-s3` (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) as environment
variables, the names `musiclora.storage.StoreSettings.from_env` reads. The Secret is never in
git: `musiclora k8s secret` prints one from the current environment.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

APP_DIR = "/home/ray/musiclora"  # the Dockerfile's WORKDIR: the repository inside the image
IMAGE = "musiclora"
STORAGE_CONFIGMAP = "musiclora-storage"
RUNTIME_CONFIGMAP = "musiclora-runtime"
S3_SECRET = "musiclora-s3"
API_SECRET = "musiclora-api"  # required by serving pods: MUSICLORA_API_KEY, the serve endpoint's bearer key
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
GCS_PORT, DASHBOARD_PORT, CLIENT_PORT, AGENT_PORT, SERVE_PORT = 6379, 8265, 10001, 52365, 8000
LABELS = {"app.kubernetes.io/name": "musiclora", "app.kubernetes.io/part-of": "musiclora"}
BASE_DIR = "k8s/base"
GPU_OVERLAY_DIR = "k8s/overlays/gpu"


class K8sRenderError(ValueError):
    """A source the manifests are built from is missing or malformed; the message names it."""


# --------------------------------------------------------------------------- what runs where


@dataclass(frozen=True)
class Resources:
    """Requests == limits for one container (Ray sizes itself from the limits).

    Attributes:
        cpu: Kubernetes CPU quantity, e.g. "2" or "500m".
        memory: Kubernetes memory quantity, e.g. "8Gi".
        gpu: `nvidia.com/gpu` count (0: none).
    """

    cpu: str
    memory: str
    gpu: int = 0

    def to_k8s(self) -> dict[str, dict[str, str | int]]:
        amount: dict[str, str | int] = {"cpu": self.cpu, "memory": self.memory}
        if self.gpu:
            amount["nvidia.com/gpu"] = self.gpu
        return {"requests": dict(amount), "limits": dict(amount)}


@dataclass(frozen=True)
class WorkerGroup:
    """One autoscaled worker group: the Ray autoscaler keeps its size within [min, max]."""

    name: str
    resources: Resources
    min_replicas: int
    max_replicas: int


@dataclass(frozen=True)
class Job:
    """One RayJob: `python ray_jobs/<script> --config <config> <overrides>` on its own cluster.

    Attributes:
        name: suffix of the RayJob's name (`musiclora-<name>`).
        config: repository-relative YAML; its first line names the script that runs it.
        overrides: dotted key=value overrides for the cluster (object-store URLs, bases ...).
        workers: the job cluster's worker group.
        active_deadline_s: the RayJob fails after this many seconds.
    """

    name: str
    config: str
    overrides: tuple[str, ...] = ()
    workers: WorkerGroup = WorkerGroup("workers", Resources("2", "8Gi"), 0, 2)
    active_deadline_s: int = 6 * 3600


HEAD = Resources("2", "8Gi")
SUBMITTER = Resources("500m", "512Mi")
AUTOSCALER = Resources("500m", "512Mi")
JOB_TTL_S = 3600  # the finished RayJob (and its status) stays this long, its cluster is gone at once

# The corpus (metadata.jsonl + audio) is uploaded to the bucket first, e.g. `aws s3 sync`.
# One prepare makes shards with a `val` split, for the train job and for the search (its objective
# is the validation loss).
JOBS = (
    Job("prepare", "ray_jobs/configs/prepare_musicgen_melody_tiny_val.yaml",
        ("metadata=s3://musiclora/corpus/demo/metadata.jsonl",)),
    Job("train", "ray_jobs/configs/musicgen_melody_tiny.yaml",
        ("data.shards_url=s3://musiclora/shards/musicgen-melody/demo-val",
         "data.prepare_config=prepare_musicgen_melody_tiny_val.yaml")),
    Job("tune", "ray_jobs/configs/tune_musicgen_melody_tiny.yaml",
        workers=WorkerGroup("workers", Resources("2", "8Gi"), 0, 4), active_deadline_s=12 * 3600),
)
# The `gpu` overlay runs the real-size configs (its resource patch gives workers the GPUs).
GPU_JOBS = (
    Job("prepare", "ray_jobs/configs/prepare_musicgen_melody.yaml", ("metadata=s3://musiclora/corpus/demo/metadata.jsonl",)),
    Job("train", "ray_jobs/configs/musicgen_melody.yaml"),
    Job("tune", "ray_jobs/configs/tune_musicgen_melody.yaml"),
)
CLUSTER_WORKERS = WorkerGroup("workers", Resources("2", "8Gi"), 0, 4)
SERVE_WORKERS = WorkerGroup("workers", Resources("2", "8Gi"), 1, 4)

# serve/config.yaml runs on loopback for `serve run`; in a RayService every pod's proxy serves
# KubeRay's serve Service on port 8000, and the code is in the image (no working_dir upload).
SERVE_K8S: dict[str, Any] = {"proxy_location": "EveryNode", "http_options": {"host": "0.0.0.0", "port": SERVE_PORT}}
# What the `gpu` overlay changes in the served app (lists of named entries merge by `name`).
# Every served model gets its real-size base and one GPU per replica.
SERVE_GPU_BASES = {"musicgen-melody": "facebook/musicgen-melody", "audioldm2": "cvssp/audioldm2-music",
                   "stable-audio-open": "stabilityai/stable-audio-open-1.0"}
SERVE_GPU: dict[str, Any] = {
    "applications": [{
        "name": "musiclora",
        "args": {"models": [{"name": name, "base": base, "base_aliases": [], "torch_threads": 4, "device": "cuda",
                             "dtype": "bfloat16"} for name, base in SERVE_GPU_BASES.items()]},
        "deployments": [{"name": f"Model-{name}", "ray_actor_options": {"num_cpus": 4, "num_gpus": 1}}
                        for name in SERVE_GPU_BASES],
    }],
}


# --------------------------------------------------------------------------- project facts


@dataclass
class Project:
    """The facts the manifests repeat, read from the repository.

    Attributes:
        repo: repository root.
        version: package version (pyproject.toml), the image tag.
        ray_version: the pinned Ray (constraints/cpu.txt).
        serve_config: serve/config.yaml, parsed.
    """

    repo: Path
    version: str
    ray_version: str
    serve_config: dict[str, Any] = field(repr=False)

    @property
    def image(self) -> str:
        return f"{IMAGE}:{self.version}"


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise K8sRenderError(f"{what}: cannot read {path} ({exc.strerror or exc})") from None


def load_project(repo: str | Path) -> Project:
    """Read version, Ray pin and serve config from the repository at `repo`.

    Raises:
        K8sRenderError: pyproject.toml, constraints/cpu.txt or serve/config.yaml is missing or
            lacks what is needed (the message names the file).
    """
    repo = Path(repo).resolve()
    pyproject = tomllib.loads(_read(repo / "pyproject.toml", "package version"))
    version = pyproject.get("project", {}).get("version")
    if not version:
        raise K8sRenderError(f"{repo / 'pyproject.toml'}: no [project] version (the image tag)")
    pin = re.search(r"^ray==([\w.]+)\s*$", _read(repo / "constraints/cpu.txt", "Ray pin"), re.MULTILINE)
    if not pin:
        raise K8sRenderError(f"{repo / 'constraints/cpu.txt'}: no `ray==X.Y.Z` pin (rayVersion, base image)")
    serve_path = repo / "serve/config.yaml"
    serve_cfg = yaml.safe_load(_read(serve_path, "RayService serveConfigV2 (Ray Serve app config)"))
    if not isinstance(serve_cfg, dict) or not serve_cfg.get("applications"):
        raise K8sRenderError(f"{serve_path}: expected a Ray Serve config with `applications`")
    return Project(repo, version, pin.group(1), serve_cfg)


# --------------------------------------------------------------------------- entrypoints


def config_script(repo: Path, config: str) -> str:
    """The `ray_jobs/` script that a job config's first line launches.

    Raises:
        K8sRenderError: the config is missing, its first line is not `# ray job submit ... --
            python ray_jobs/<script>.py --config <this config> ...`, or the script is missing.
    """
    head = _read(repo / config, f"job config {config}").splitlines()[:1]
    match = re.match(r"#\s*ray job submit .*? -- python (\S+) --config (\S+)", head[0] if head else "")
    if not match:
        raise K8sRenderError(f"{config}: first line must be the launch command "
                             "`# ray job submit ... -- python ray_jobs/<script>.py --config <config> ...`")
    script, named = match.groups()
    if named != config:
        raise K8sRenderError(f"{config}: its launch command names --config {named}, not itself")
    if not (repo / script).is_file():
        raise K8sRenderError(f"{config}: launch script {script} does not exist")
    return script


def job_entrypoint(repo: Path, job: Job) -> str:
    """The RayJob entrypoint: absolute paths inside the image, so the driver's cwd does not matter."""
    script = config_script(repo, job.config)
    return shlex.join(["python", f"{APP_DIR}/{script}", "--config", f"{APP_DIR}/{job.config}", *job.overrides])


def parse_entrypoint(entrypoint: str) -> tuple[str, str, list[str]]:
    """Split a RayJob entrypoint into (script, config, overrides), paths relative to the repository.

    Raises:
        ValueError: not `python <APP_DIR>/<script> --config <APP_DIR>/<config> [key=value ...]`.
    """
    argv = shlex.split(entrypoint)
    if len(argv) < 4 or argv[0] != "python" or argv[2] != "--config":
        raise ValueError(f"entrypoint {entrypoint!r}: expected python <script> --config <config> [key=value ...]")
    script, config = argv[1], argv[3]
    for path in (script, config):
        if not path.startswith(APP_DIR + "/"):
            raise ValueError(f"entrypoint {entrypoint!r}: {path} is not inside the image's {APP_DIR}")
    return script[len(APP_DIR) + 1:], config[len(APP_DIR) + 1:], argv[4:]


# --------------------------------------------------------------------------- serve config


def merge_config(base: Any, over: Any) -> Any:
    """Deep-merge `over` into a copy of `base`: dicts merge, lists of `name`d dicts merge by name
    (new names appended), anything else is replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = copy.deepcopy(base)
        for key, value in over.items():
            out[key] = merge_config(out[key], value) if key in out else copy.deepcopy(value)
        return out
    named = lambda items: isinstance(items, list) and all(isinstance(i, dict) and "name" in i for i in items)
    if named(base) and named(over):
        out = copy.deepcopy(base)
        index = {item["name"]: i for i, item in enumerate(out)}
        for item in over:
            if item["name"] in index:
                out[index[item["name"]]] = merge_config(out[index[item["name"]]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(over)


def serve_config_for_k8s(serve_cfg: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """serve/config.yaml as a RayService's serveConfigV2: `SERVE_K8S` merged, local `working_dir`s
    dropped (the code is in the image at `APP_DIR`, on PYTHONPATH), then `overrides` merged."""
    cfg = merge_config(dict(serve_cfg), SERVE_K8S)
    for app in cfg.get("applications", []):
        env = app.get("runtime_env") or {}
        if "working_dir" in env and "://" not in str(env["working_dir"]):
            env.pop("working_dir")
            if not env:
                app.pop("runtime_env")
    return merge_config(cfg, dict(overrides or {}))


# --------------------------------------------------------------------------- pod templates


def _http_probe(path: str, port: int, failure_threshold: int, initial_delay_s: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "initialDelaySeconds": initial_delay_s,
            "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": failure_threshold}


def ray_pod_template(role: str, image: str, resources: Resources, serve: bool = False) -> dict[str, Any]:
    """A Ray head or worker PodTemplateSpec: storage env from the ConfigMaps + Secret, requests ==
    limits, readiness (raylet health) and liveness (GCS health on the head, raylet on workers)
    probes, /dev/shm in memory for the object store.

    Args:
        role: "head" or "worker".
        serve: expose Serve's HTTP port (RayService pods).
    """
    ports = [{"containerPort": SERVE_PORT, "name": "serve"}] if serve else []
    if role == "head":
        ports = [{"containerPort": GCS_PORT, "name": "gcs-server"}, {"containerPort": DASHBOARD_PORT, "name": "dashboard"},
                 {"containerPort": CLIENT_PORT, "name": "client"}, *ports]
        liveness = _http_probe("/api/gcs_healthz", DASHBOARD_PORT, 120, 30)
    else:
        liveness = _http_probe("/api/local_raylet_healthz", AGENT_PORT, 120, 30)
    container: dict[str, Any] = {
        "name": f"ray-{role}",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "envFrom": [{"configMapRef": {"name": STORAGE_CONFIGMAP}}, {"configMapRef": {"name": RUNTIME_CONFIGMAP}},
                    {"secretRef": {"name": S3_SECRET}}],
        "resources": resources.to_k8s(),
        "readinessProbe": _http_probe("/api/local_raylet_healthz", AGENT_PORT, 10, 10),
        "livenessProbe": liveness,
        "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}, {"name": "ray-logs", "mountPath": "/tmp/ray"}],
    }
    if serve:
        container["envFrom"].append({"secretRef": {"name": API_SECRET}})  # fail closed: no key, no pod
    if ports:
        container["ports"] = ports
    return {
        "metadata": {"labels": {**LABELS, "app.kubernetes.io/component": f"ray-{role}"}},
        "spec": {
            "containers": [container],
            "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}}, {"name": "ray-logs", "emptyDir": {}}],
        },
    }


def cluster_spec(project: Project, workers: WorkerGroup, serve: bool = False) -> dict[str, Any]:
    """A RayClusterSpec: head (schedules no tasks) + one autoscaled worker group, in-tree autoscaler on."""
    return {
        "rayVersion": project.ray_version,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 60,
                              "resources": AUTOSCALER.to_k8s()},
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
            "template": ray_pod_template("head", project.image, HEAD, serve),
        },
        "workerGroupSpecs": [{
            "groupName": workers.name,
            "replicas": workers.min_replicas,
            "minReplicas": workers.min_replicas,
            "maxReplicas": workers.max_replicas,
            "rayStartParams": {},
            "template": ray_pod_template("worker", project.image, workers.resources, serve),
        }],
    }


def _metadata(name: str, component: str) -> dict[str, Any]:
    return {"name": name, "labels": {**LABELS, "app.kubernetes.io/component": component}}


def build_raycluster(project: Project) -> dict[str, Any]:
    """The interactive RayCluster `musiclora` (connect with `ray job submit` / the Ray client)."""
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": _metadata("musiclora", "interactive"),
            "spec": cluster_spec(project, CLUSTER_WORKERS)}


def build_rayjob(project: Project, job: Job) -> dict[str, Any]:
    """RayJob `musiclora-<job>`: its own cluster, deleted when the job ends; the CR after the TTL."""
    submitter = {"spec": {"restartPolicy": "Never", "containers": [{
        "name": "ray-job-submitter", "image": project.image, "imagePullPolicy": "IfNotPresent",
        "resources": SUBMITTER.to_k8s()}]}}
    return {
        "apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _metadata(f"musiclora-{job.name}", job.name),
        "spec": {
            "entrypoint": job_entrypoint(project.repo, job),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": JOB_TTL_S,
            "activeDeadlineSeconds": job.active_deadline_s,
            "backoffLimit": 0,
            "submissionMode": "K8sJobMode",
            "submitterPodTemplate": submitter,
            "rayClusterSpec": cluster_spec(project, job.workers),
        },
    }


def build_rayservice(project: Project) -> dict[str, Any]:
    """RayService `musiclora-serve`: serveConfigV2 from serve/config.yaml, autoscaled workers."""
    serve_cfg = serve_config_for_k8s(project.serve_config)
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService", "metadata": _metadata("musiclora-serve", "serve"),
        "spec": {"serveConfigV2": dump_yaml(serve_cfg), "rayClusterConfig": cluster_spec(project, SERVE_WORKERS, True)},
    }


def build_kustomization(files: list[str]) -> dict[str, Any]:
    """The base kustomization: the manifests + the two ConfigMaps (no Secret: see `musiclora k8s secret`)."""
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "labels": [{"pairs": {"app.kubernetes.io/managed-by": "kustomize"}}],
        "resources": files,
        "configMapGenerator": [
            # empty endpoint = AWS S3; overlays point it at MinIO / SeaweedFS / GCS's S3 API
            {"name": STORAGE_CONFIGMAP, "literals": ["AWS_ENDPOINT_URL=", "AWS_DEFAULT_REGION=us-east-1"]},
            {"name": RUNTIME_CONFIGMAP, "literals": ["DS_ACCELERATOR=cpu", "TOKENIZERS_PARALLELISM=false",
                                                     f"PYTHONPATH={APP_DIR}"]},
        ],
        # Ray pods do not roll on a ConfigMap change, and kustomize cannot rename refs inside CRs
        "generatorOptions": {"disableNameSuffixHash": True},
    }


def build_gpu_patches(project: Project) -> list[dict[str, Any]]:
    """The `gpu` overlay's generated merge patches: RayJob entrypoints of `GPU_JOBS` and the
    RayService's serveConfigV2 with `SERVE_GPU`."""
    patches: list[dict[str, Any]] = [
        {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": f"musiclora-{job.name}"},
         "spec": {"entrypoint": job_entrypoint(project.repo, job)}} for job in GPU_JOBS
    ]
    serve_cfg = serve_config_for_k8s(project.serve_config, SERVE_GPU)
    patches.append({"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "musiclora-serve"},
                    "spec": {"serveConfigV2": dump_yaml(serve_cfg)}})
    return patches


# --------------------------------------------------------------------------- secrets


def secret_manifest(values: Mapping[str, str], name: str = S3_SECRET, namespace: str | None = None) -> dict[str, Any]:
    """A Secret with the object-store keys (`SECRET_KEYS`) as `stringData`.

    Raises:
        K8sRenderError: a key of `SECRET_KEYS` is missing or empty in `values`.
    """
    missing = [k for k in SECRET_KEYS if not values.get(k)]
    if missing:
        raise K8sRenderError(f"object-store Secret: {', '.join(missing)} not set (export them first)")
    meta: dict[str, Any] = {"name": name, "labels": dict(LABELS)}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque",
            "stringData": {k: values[k] for k in SECRET_KEYS}}


# --------------------------------------------------------------------------- rendering


class _Dumper(yaml.SafeDumper):
    pass


def _str_presenter(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_presenter)


def dump_yaml(*docs: Any) -> str:
    """YAML text of `docs` (multi-line strings as `|` blocks), `---` between documents."""
    return "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=4096) for d in docs)


def _header(sources: str) -> str:
    return (f"# Generated by `musiclora k8s render` from {sources}.\n"
            "# Do not edit: change the sources or src/musiclora/k8s.py and render again.\n")


def render(repo: str | Path) -> dict[str, str]:
    """All generated files: repository-relative path -> text.

    Raises:
        K8sRenderError: a source is missing or malformed (see `load_project`, `config_script`).
    """
    project = load_project(repo)
    versions = "pyproject.toml (image tag), constraints/cpu.txt (rayVersion)"
    manifests = {
        "raycluster.yaml": (build_raycluster(project), versions),
        **{f"rayjob-{job.name}.yaml": (build_rayjob(project, job), f"{job.config}, {versions}") for job in JOBS},
        "rayservice.yaml": (build_rayservice(project), f"serve/config.yaml, {versions}"),
    }
    out = {f"{BASE_DIR}/{name}": _header(src) + dump_yaml(doc) for name, (doc, src) in manifests.items()}
    out[f"{BASE_DIR}/kustomization.yaml"] = _header("src/musiclora/k8s.py") + dump_yaml(build_kustomization(list(manifests)))
    gpu_sources = ", ".join(sorted({j.config for j in GPU_JOBS} | {"serve/config.yaml"}))
    out[f"{GPU_OVERLAY_DIR}/generated-patches.yaml"] = _header(gpu_sources) + dump_yaml(*build_gpu_patches(project))
    placeholder = {k: "REPLACE-ME" for k in SECRET_KEYS}
    out["k8s/secret.example.yaml"] = (
        _header("src/musiclora/k8s.py")
        + "# The object-store keys every Ray pod reads. Never commit real values: create the Secret with\n"
        + "#   musiclora k8s secret --namespace NS | kubectl apply -f -     (from your AWS_* variables)\n"
        + f"# The serve endpoint's bearer key (Secret {API_SECRET}, key MUSICLORA_API_KEY) is required: the serving\n"
        + "# pods do not start without it, and the app refuses to start when the variable is empty:\n"
        + f"#   kubectl create secret generic {API_SECRET} --from-literal=MUSICLORA_API_KEY=...\n"
        + dump_yaml(secret_manifest(placeholder)))
    return out


def write_rendered(repo: str | Path, files: Mapping[str, str]) -> list[str]:
    """Write `files` under `repo`; returns the paths whose content changed."""
    changed = []
    for rel, text in files.items():
        path = Path(repo) / rel
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            changed.append(rel)
    return changed


def stale_files(repo: str | Path, files: Mapping[str, str]) -> list[str]:
    """Paths of `files` that are missing under `repo` or differ from the rendered text."""
    return [rel for rel, text in files.items()
            if not (Path(repo) / rel).is_file() or (Path(repo) / rel).read_text() != text]


def find_repo(start: str | Path = ".") -> Path:
    """The musiclora repository containing `start` (the folder with its pyproject.toml).

    Raises:
        K8sRenderError: none above `start`.
    """
    for folder in [Path(start).resolve(), *Path(start).resolve().parents]:
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file() and re.search(r'^name\s*=\s*"musiclora"', pyproject.read_text(), re.MULTILINE):
            return folder
    raise K8sRenderError(f"no musiclora repository (pyproject.toml with name = \"musiclora\") at or above {start}")
