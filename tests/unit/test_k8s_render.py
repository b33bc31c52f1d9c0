"""`musiclora k8s render`: the generated manifests match the project's config, and what is hand-written
(Dockerfile, .dockerignore, overlay image tags, cluster/ YAMLs) agrees with the same sources."""

from __future__ import annotations

import fnmatch
import re
import shutil
import tomllib
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from musiclora import k8s
from musiclora.cli.k8s import app

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def _ray_pin() -> str:
    return re.search(r"^ray==(\S+)$", (REPO / "constraints/cpu.txt").read_text(), re.MULTILINE).group(1)


def _mini_repo(tmp_path: Path) -> Path:
    """A copy of what `render` reads and writes: pyproject, constraints, serve config, ray_jobs, k8s."""
    for rel in ("pyproject.toml", "constraints", "serve/config.yaml", "ray_jobs", "k8s"):
        src, dst = REPO / rel, tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return tmp_path


# --------------------------------------------------------------------------- drift


def test_generated_files_are_up_to_date():
    stale = k8s.stale_files(REPO, k8s.render(REPO))
    assert not stale, f"stale generated manifests {stale}: run `musiclora k8s render`"


def test_render_check_flags_a_serve_config_change_and_render_fixes_it(tmp_path):
    repo = _mini_repo(tmp_path)
    assert runner.invoke(app, ["render", "--check", "--repo", str(repo)]).exit_code == 0
    cfg = yaml.safe_load((repo / "serve/config.yaml").read_text())
    cfg["applications"][0]["deployments"][0]["num_replicas"] = 3
    (repo / "serve/config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    result = runner.invoke(app, ["render", "--check", "--repo", str(repo)])
    assert result.exit_code == 1
    assert "stale: k8s/base/rayservice.yaml" in result.output
    assert "rayjob" not in result.output  # only what depends on the serve config

    assert runner.invoke(app, ["render", "--repo", str(repo)]).exit_code == 0
    service = yaml.safe_load((repo / "k8s/base/rayservice.yaml").read_text())
    serve_cfg = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_cfg["applications"][0]["deployments"][0]["num_replicas"] == 3
    assert runner.invoke(app, ["render", "--check", "--repo", str(repo)]).exit_code == 0


def test_version_bump_moves_every_image_tag(tmp_path):
    repo = _mini_repo(tmp_path)
    pyproject = repo / "pyproject.toml"
    pyproject.write_text(re.sub(r'^version = ".*"$', 'version = "9.8.7"', pyproject.read_text(), flags=re.MULTILINE))
    files = k8s.render(repo)
    images = set(re.findall(r"image: (\S+)", "".join(files.values())))
    assert images == {"musiclora:9.8.7"}


def test_missing_serve_config_fails_naming_it(tmp_path):
    repo = _mini_repo(tmp_path)
    (repo / "serve/config.yaml").unlink()
    result = runner.invoke(app, ["render", "--repo", str(repo)])
    assert result.exit_code == 2
    assert "serve/config.yaml" in result.output and "serveConfigV2" in result.output


def test_job_config_without_launch_line_fails_naming_it(tmp_path):
    repo = _mini_repo(tmp_path)
    cfg = repo / "ray_jobs/configs/musicgen_melody_tiny.yaml"
    cfg.write_text("\n".join(cfg.read_text().splitlines()[1:]))
    with pytest.raises(k8s.K8sRenderError, match="musicgen_melody_tiny.yaml: first line must be the launch command"):
        k8s.render(repo)


def test_renamed_script_fails_naming_it(tmp_path):
    repo = _mini_repo(tmp_path)
    (repo / "ray_jobs/train.py").rename(repo / "ray_jobs/train_v2.py")
    with pytest.raises(k8s.K8sRenderError, match="launch script ray_jobs/train.py does not exist"):
        k8s.render(repo)


# --------------------------------------------------------------------------- pieces


def test_entrypoint_runs_the_script_the_config_names():
    job = k8s.Job("train", "ray_jobs/configs/musicgen_melody_tiny.yaml", ("run.name=x y",))
    entry = k8s.job_entrypoint(REPO, job)
    assert k8s.parse_entrypoint(entry) == ("ray_jobs/train.py", "ray_jobs/configs/musicgen_melody_tiny.yaml",
                                           ["run.name=x y"])


@pytest.mark.parametrize("entry", ["python ray_jobs/train.py --config c.yaml",
                                   f"bash {k8s.APP_DIR}/x.sh --config {k8s.APP_DIR}/c.yaml", "python"])
def test_parse_entrypoint_rejects_other_shapes(entry):
    with pytest.raises(ValueError, match="entrypoint"):
        k8s.parse_entrypoint(entry)


def test_serve_config_for_k8s_listens_on_all_pod_interfaces_and_drops_local_working_dir():
    local = {"http_options": {"host": "127.0.0.1", "port": 33080, "request_timeout_s": 600},
             "applications": [{"name": "a", "import_path": "serve.app:build_app",
                               "runtime_env": {"working_dir": "."}},
                              {"name": "b", "import_path": "x:y",
                               "runtime_env": {"working_dir": "s3://b/code.zip", "env_vars": {"A": "1"}}}]}
    out = k8s.serve_config_for_k8s(local, {"applications": [{"name": "b", "route_prefix": "/b"}]})
    assert out["http_options"] == {"host": "0.0.0.0", "port": k8s.SERVE_PORT, "request_timeout_s": 600}
    assert "runtime_env" not in out["applications"][0]
    assert out["applications"][1]["runtime_env"]["working_dir"] == "s3://b/code.zip"
    assert out["applications"][1]["route_prefix"] == "/b" and out["applications"][1]["import_path"] == "x:y"
    assert local["http_options"]["host"] == "127.0.0.1"  # input untouched


def test_merge_config_merges_named_entries_by_name():
    base = {"d": [{"name": "A", "x": 1, "o": {"p": 1}}, {"name": "B", "x": 2}], "k": [1, 2]}
    out = k8s.merge_config(base, {"d": [{"name": "B", "x": 3}, {"name": "C"}], "k": [3]})
    assert out == {"d": [{"name": "A", "x": 1, "o": {"p": 1}}, {"name": "B", "x": 3}, {"name": "C"}], "k": [3]}


# --------------------------------------------------------------------------- secrets


def test_secret_command_prints_the_keys_from_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-TEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    result = runner.invoke(app, ["secret", "--namespace", "ns"])
    assert result.exit_code == 0, result.output
    secret = yaml.safe_load(result.stdout)
    assert secret["metadata"] == {"name": k8s.S3_SECRET, "namespace": "ns", "labels": k8s.LABELS}
    assert secret["stringData"] == {"AWS_ACCESS_KEY_ID": "AKIA-TEST", "AWS_SECRET_ACCESS_KEY": "s3cr3t"}


def test_secret_command_without_keys_fails_naming_them(monkeypatch):
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-TEST")
    result = runner.invoke(app, ["secret"])
    assert result.exit_code == 2 and "AWS_SECRET_ACCESS_KEY not set" in result.output


def test_no_object_store_keys_in_git():
    """Every file under k8s/ and cluster/ carries placeholders at most; no Secret in the kustomize tree."""
    for path in [*(REPO / "k8s").rglob("*.yaml"), *(REPO / "cluster").rglob("*.yaml")]:
        text = path.read_text()
        for key in k8s.SECRET_KEYS:
            for value in re.findall(rf"{key}\s*[:=]\s*(\S+)", text):
                assert value in ("REPLACE-ME", "...", "\\n"), f"{path}: {key} has a value"
        if path.name != "secret.example.yaml":
            assert "kind: Secret" not in text, path


# --------------------------------------------------------------------------- Dockerfile


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate, pat = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatchcase(c, pat) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerfile_builds_on_the_pinned_ray_and_python():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.MULTILINE).group(1) == _ray_pin()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py(\d+)-\$\{RAY_VARIANT\}$", text, re.MULTILINE).group(1) == "311"
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert "3.11" in requires
    assert re.search(r"^WORKDIR (\S+)$", text, re.MULTILINE).group(1) == k8s.APP_DIR
    assert f"PYTHONPATH={k8s.APP_DIR}" in text  # serve.app (import_path) and ray_jobs importable
    pip_lines = [line for line in text.splitlines() if re.search(r"\bpip install\b", line)]
    assert pip_lines and all("-c /tmp/constraints.txt" in line for line in pip_lines)


def test_image_holds_everything_the_manifests_run():
    """Each COPY source exists and survives .dockerignore, and so do the job scripts, their configs,
    the Serve app and the package; local state (.venv, .musiclora, .git) stays out."""
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied = [src for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith("COPY")
              for src in line.split()[1:-1] if not src.startswith("--")]
    for src in copied:
        assert (REPO / src).exists() and not _dockerignored(src.rstrip("/"), patterns), src
    needed = {"serve/app.py", "serve/config.yaml", "src/musiclora/k8s.py"}
    for job in (*k8s.JOBS, *k8s.GPU_JOBS):
        needed |= {job.config, k8s.config_script(REPO, job.config)}
    for rel in sorted(needed):
        assert not _dockerignored(rel, patterns), f"{rel} is excluded by .dockerignore"
        assert any(rel == s.rstrip("/") or rel.startswith(s) for s in copied), f"{rel} is not COPYed"
    for local in (".venv/bin/python", ".musiclora/store/s3.json", ".git/config", "src/musiclora/__pycache__/x.pyc"):
        assert _dockerignored(local, patterns), local


# --------------------------------------------------------------------------- tags and cluster YAMLs


def test_hand_written_image_tags_follow_the_package_version():
    gpu = yaml.safe_load((REPO / "k8s/overlays/gpu/kustomization.yaml").read_text())
    assert gpu["images"] == [{"name": k8s.IMAGE, "newTag": f"{_version()}-gpu"}]
    aws = yaml.safe_load((REPO / "cluster/gpu-aws.yaml").read_text())
    assert aws["docker"]["image"].rsplit("/", 1)[-1] == f"{k8s.IMAGE}:{_version()}-gpu"


def test_local_cluster_never_runs_ray_stop():
    """On a shared machine `ray stop` would end other people's clusters too."""
    cfg = yaml.safe_load((REPO / "cluster/local.yaml").read_text())
    commands = [c for key, value in cfg.items() if key.endswith("_commands") for c in value]
    assert commands and not any(re.search(r"\bray stop\b", c) for c in commands)


def test_gpu_cluster_fits_the_real_size_training_config():
    from musiclora.config import TrainConfig, load_config

    run = load_config(REPO / "ray_jobs/configs/musicgen_melody.yaml", [], TrainConfig).run
    aws = yaml.safe_load((REPO / "cluster/gpu-aws.yaml").read_text())
    worker = aws["available_node_types"]["gpu-worker"]
    assert run.use_gpu and worker["max_workers"] >= run.num_workers  # one GPU per g5 node
    assert aws["max_workers"] >= worker["max_workers"]
