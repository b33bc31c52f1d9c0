"""Run serve/config.yaml with overrides, the way `serve run` does, and watch its replicas.

Used by the integration test and `bench/serve.py`: they start `serve run <config>` as a
subprocess (the real command) against a cluster, after `write_config` merged their overrides
(ports, registry, limits, autoscaling delays) into serve/config.yaml.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "serve" / "config.yaml"
APP = "musiclora"


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `over` into a copy of `base` (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_config(path: str | Path, http_port: int, args: dict[str, Any] | None = None,
                 deployments: dict[str, dict[str, Any]] | None = None, app: dict[str, Any] | None = None) -> Path:
    """serve/config.yaml with the HTTP port, app `args` and per-deployment settings overridden.

    Args:
        path: where to write the merged YAML.
        http_port: Serve's HTTP port on 127.0.0.1.
        args: merged into the application's `args` (`models` replaces the list; the shipped
            `Model-<name>` deployments of models no longer in the list are dropped, since Serve
            refuses settings for a deployment the app does not build).
        deployments: deployment name -> settings merged into that deployment's entry (added if new).
        app: other keys merged into the application entry (e.g. `runtime_env`).
    """
    from serve.app import MODEL_PREFIX

    config = yaml.safe_load(CONFIG.read_text())
    config["http_options"]["port"] = http_port
    entry = merge(config["applications"][0], app or {})
    entry["args"] = merge(entry["args"], args or {})
    deps = {d["name"]: d for d in entry.get("deployments", [])}
    for name, over in (deployments or {}).items():
        deps[name] = merge(deps.get(name, {"name": name}), over)
    served = {MODEL_PREFIX + m["name"] for m in entry["args"]["models"]}
    entry["deployments"] = [d for d in deps.values() if not d["name"].startswith(MODEL_PREFIX) or d["name"] in served]
    config["applications"][0] = entry
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
    return Path(path)


# Run by a fresh interpreter in the child: SIGINT back to its default action, then exec the command
# (exec keeps a default disposition, and the command's Python then installs KeyboardInterrupt).
_RESET_SIGINT = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])"


def spawn(cmd: list[str], **kwargs) -> subprocess.Popen:
    """`subprocess.Popen` of `cmd` in its own session (a process group to signal) that Ctrl-C stops.

    A process started in the background by a non-interactive shell (`cmd &`, as CI runners and
    `nohup` do) ignores SIGINT, and its children inherit that: Python then installs no
    KeyboardInterrupt handler, so `serve run` would sit out Ctrl-C, be SIGKILLed, and leave its
    application holding the cluster's CPUs. The child resets SIGINT before exec'ing `cmd` (a
    launcher interpreter rather than `preexec_fn`, which is unsafe in a threaded parent).
    """
    return subprocess.Popen([sys.executable, "-c", _RESET_SIGINT, *cmd], start_new_session=True, **kwargs)


class ServeRun:
    """`serve run CONFIG` as a subprocess (repository root as cwd), stopped with Ctrl-C.

    Args:
        config: the YAML to run.
        address: the Ray cluster's GCS address.
        env: extra environment (Ray auth variables ...).
        log: file for the command's output.
    """

    def __init__(self, config: str | Path, address: str, env: dict[str, str] | None = None,
                 log: str | Path | None = None):
        self.config, self.address, self.env = str(config), address, env or {}
        self.log = Path(log or Path(config).with_suffix(".log"))
        self.proc: subprocess.Popen | None = None
        self.port = yaml.safe_load(Path(config).read_text())["http_options"]["port"]
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 300) -> ServeRun:
        """Start and wait until the ingress answers GET /healthz (model replicas may still be starting).

        Raises:
            RuntimeError: not up within `timeout_s` (the log's tail is included).
        """
        serve_bin = str(Path(sys.executable).with_name("serve"))
        env = {**os.environ, **self.env, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")])}
        env.pop("RAY_ADDRESS", None)
        with open(self.log, "ab") as out:  # the child keeps its own copy of the descriptor
            self.proc = spawn([serve_bin, "run", "--address", self.address, self.config], cwd=REPO, env=env,
                              stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if _http_ok(self.url + "/healthz"):
                return self
            time.sleep(1.0)
        tail = self.log.read_text(errors="replace")[-4000:]
        self.stop()
        raise RuntimeError(f"`serve run {self.config}` was not up within {timeout_s:.0f} s:\n{tail}")

    def stop(self, timeout_s: float = 60) -> None:
        """Ctrl-C (serve run then shuts Serve down), SIGKILL of its process group after `timeout_s`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def replicas(dashboard_url: str, token: str | None, deployment: str, app: str = APP) -> dict[str, Any]:
    """A deployment's replicas from the dashboard's Serve REST API (no Ray driver needed).

    Returns:
        {"states": {"RUNNING": 2, ...}, "target": target replica count or None}; empty states
        when the application or deployment is not there (yet).
    """
    req = urllib.request.Request(f"{dashboard_url}/api/serve/applications/",
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=10) as r:
        details = json.loads(r.read())
    dep = (details.get("applications") or {}).get(app, {}).get("deployments", {}).get(deployment)
    if not dep:
        return {"states": {}, "target": None}
    states: dict[str, int] = {}
    for replica in dep["replicas"]:
        states[replica["state"]] = states.get(replica["state"], 0) + 1
    return {"states": states, "target": dep.get("target_num_replicas")}


def _http_ok(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as r:
            return r.status == 200 and json.loads(r.read()).get("status") == "ok"
    except (OSError, ValueError):
        return False
