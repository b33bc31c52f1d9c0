"""A local Ray head on 127.0.0.1 for the demo and the tests, started and stopped by its PID.

`ray stop` would kill every Ray process on the host (other users' clusters too), so the head
runs as `ray start --head --block` in its own process group and is stopped by signalling that
group. Ports are pinned (GCS, dashboard, client) so two clusters on one host do not confuse
Ray Train V2, token authentication stays on with a project-local token file, and
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` keeps Ray from binding every interface.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


class LocalRay:
    """One single-host Ray cluster whose state lives in `state_dir`.

    Args:
        state_dir: folder for the auth token, logs, Ray's temp dir and the state file.
        gcs_port: GCS port (`ray start --port`).
        dashboard_port: dashboard / job-submission HTTP port D; the Ray client server takes D+1 and
            the dashboard agent D+2 (their defaults are fixed ports that two clusters would share).
        num_cpus: CPUs the head advertises (None: all).
    """

    def __init__(self, state_dir: str | Path, gcs_port: int = 6390, dashboard_port: int = 8265,
                 num_cpus: int | None = None):
        self.dir = Path(state_dir).resolve()
        self.gcs_port, self.dashboard_port, self.num_cpus = gcs_port, dashboard_port, num_cpus
        self.state_file = self.dir / "ray.json"
        self.token_file = self.dir / "auth_token"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        """Variables a client (ray job submit, ray.init) needs to reach this cluster."""
        return {
            "RAY_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_file),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }

    def start(self, extra_env: dict[str, str] | None = None, timeout_s: float = 120) -> LocalRay:
        """Start the head (or reuse a running one) and wait for the job API to answer.

        Args:
            extra_env: variables every Ray process inherits (object-store endpoint and keys ...).

        Raises:
            RuntimeError: the head did not come up in time (the tail of its log is included).
        """
        if self.status():
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.token_file.exists():
            self.token_file.write_text(secrets.token_hex(32))
            self.token_file.chmod(0o600)
        env = {**os.environ, **(extra_env or {}), **self.env()}
        # Ray processes that call ray.init() without an address (Train V2's placement-group
        # cleaner, job drivers) must find this cluster even when others run on the host.
        env["RAY_ADDRESS"] = self.address
        env.setdefault("RAY_DEDUP_LOGS", "0")  # progress lines differ only in numbers: keep every one
        ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
        cmd = [
            ray_bin, "start", "--head", "--block", f"--port={self.gcs_port}", "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true",
            f"--ray-client-server-port={self.dashboard_port + 1}",
            f"--dashboard-agent-listen-port={self.dashboard_port + 2}",
            f"--temp-dir={self.dir / 'tmp'}", "--disable-usage-stats",
        ]
        if self.num_cpus is not None:
            cmd.append(f"--num-cpus={self.num_cpus}")
        log = open(self.dir / "head.log", "ab")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.state_file.write_text(json.dumps({"pid": proc.pid, "address": self.address,
                                               "dashboard_url": self.dashboard_url}))
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if proc.poll() is not None:
                break
            if self._jobs_api_up():
                return self
            time.sleep(1.0)
        tail = (self.dir / "head.log").read_text(errors="replace")[-3000:]
        self.stop()
        raise RuntimeError(f"Ray head on {self.address} did not start within {timeout_s:.0f} s:\n{tail}")

    def _jobs_api_up(self) -> bool:
        req = urllib.request.Request(f"{self.dashboard_url}/api/version",
                                     headers={"Authorization": f"Bearer {self.token_file.read_text().strip()}"})
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def status(self) -> dict | None:
        """The state dict when the recorded head process is alive, else None."""
        if not self.state_file.exists():
            return None
        state = json.loads(self.state_file.read_text())
        try:
            os.kill(state["pid"], 0)
        except ProcessLookupError:
            return None
        return state

    def stop(self, timeout_s: float = 10) -> None:
        """Stop the head started by `start`: SIGTERM its process group, SIGKILL after `timeout_s`.

        On Ray 2.60 the raylet exits about 14 s after SIGTERM, and `ray start --block` with one
        Python helper stays until killed, so a longer grace only waits: nothing of a local head
        (no persisted GCS, jobs' output already in the object store) needs a clean shutdown.
        """
        state = self.status()
        if state:
            pgid = os.getpgid(state["pid"])
            os.killpg(pgid, signal.SIGTERM)
            deadline = time.time() + timeout_s
            while time.time() < deadline and _group_alive(pgid):
                time.sleep(0.5)
            if _group_alive(pgid):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):  # reap the head when this process started it
                os.waitpid(state["pid"], os.WNOHANG)
        self.state_file.unlink(missing_ok=True)


def _group_alive(pgid: int) -> bool:
    """True while a process of group `pgid` still runs.

    Zombies do not count: an exited process stays a zombie until its parent reaps it (the head is
    the child of whoever called `start`, and a container's PID 1 may never reap orphans), and
    `killpg(pgid, 0)` still finds it, so waiting on that alone sat out the whole timeout.
    Reads /proc where there is one, else falls back to `killpg(pgid, 0)`.
    """
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended while we looked
            continue
        fields = text[text.rindex(")") + 2:].split()  # state, ppid, pgrp, ... after "pid (comm)"
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False