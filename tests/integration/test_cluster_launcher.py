"""A 2-node Ray cluster on this one machine, started from cluster/local.yaml, runs a job.

`ray up` with the local provider needs ssh to every node IP; this machine has no sshd, so the test
plays the launcher's part with the YAML's own settings: it runs the YAML's setup and head start
commands, then the worker start commands the way the launcher sends them (Ray's
`with_head_node_ip` prefix, `$SSH_CONNECTION` as sshd sets it for a session to the worker IP),
submits a job with `ray job submit`, and stops both nodes by their process groups.

The one change: `--autoscaling-config=~/ray_bootstrap_config.yaml` is dropped from the head
command, because that file is what `ray up` writes for the head's autoscaler, which would then try
to ssh to the worker itself.

Token authentication: the YAML's start commands set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH on
every node. The nodes run with a fresh HOME of their own that holds a stale `~/.ray/auth_token` (what
any earlier local `ray.init()` leaves behind), so the test reads nothing from the real home directory
and shows that the YAML's token, not the home's default one, secures the cluster: a client with the
YAML's variables gets its job run, a client holding only the home's token is refused.

The nodes live in a network namespace of their own (only a loopback interface), so the YAML's
fixed ports cannot collide with other Ray clusters on the machine and Ray's all-interface binds
reach nothing outside it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LOCAL_YAML = REPO / "cluster" / "local.yaml"
PROBE = Path(__file__).with_name("cluster_probe.py")
BOOTSTRAP_FLAG = "--autoscaling-config=~/ray_bootstrap_config.yaml"


def _flags(command: str) -> dict[str, str]:
    """`--name=value` flags of a `ray start` command line."""
    return dict(re.match(r"--([\w-]+)=(.*)", tok).groups() for tok in shlex.split(command)
                if re.match(r"--[\w-]+=", tok))


def _ray_start_command(commands: list[str]) -> str:
    (start,) = [c for c in commands if "ray start" in c]
    return start


def _env_prefix(command: str) -> dict[str, str]:
    """`NAME=value` assignments in front of `ray start` in a start command."""
    words = shlex.split(command)
    return dict(w.split("=", 1) for w in words[:words.index("ray")] if re.fullmatch(r"[A-Z_]+=.*", w))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _stop_group(pgid: int, timeout_s: float = 20) -> None:
    """SIGTERM the process group, SIGKILL what is left after `timeout_s` (the GCS ignores SIGTERM
    once the `ray start` that launched it has exited)."""
    if not _group_alive(pgid):
        return
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.5)
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)


class Netns:
    """A network namespace held open by a `sleep`; `run`/`start` put commands inside it."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(["unshare", "--net", "sleep", "900"], start_new_session=True,
                                       stderr=subprocess.PIPE)
        time.sleep(0.2)
        if self.holder.poll() is not None:
            pytest.skip(f"cannot create a network namespace here (`unshare --net`): "
                        f"{self.holder.stderr.read().decode().strip()}")
        self.prefix = ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net", "--"]
        subprocess.run([*self.prefix, "ip", "link", "set", "lo", "up"], check=True, timeout=30)

    def start(self, command: str, env: dict[str, str], log: Path) -> subprocess.Popen:
        """`bash -c command` in the namespace, in a new process group (its pid is the pgid)."""
        with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
            return subprocess.Popen([*self.prefix, "bash", "-c", command], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def close(self) -> None:
        _stop_group(self.holder.pid, timeout_s=5)
        self.holder.wait(10)


def _run_launcher_commands(ns: Netns, commands: list[str], env: dict[str, str], log: Path,
                           groups: list[int], timeout_s: float = 240) -> None:
    """Run commands one after another as the launcher does; each one's process group is kept in
    `groups` (a `ray start` leaves its daemons there)."""
    for command in commands:
        proc = ns.start(command, env, log)
        groups.append(proc.pid)
        try:
            rc = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        if rc != 0:
            pytest.fail(f"`{command}` -> {rc}; {log} ends with:\n{log.read_text(errors='replace')[-3000:]}")


def test_two_node_cluster_from_cluster_yaml_runs_a_job():
    if not shutil.which("unshare") or not shutil.which("nsenter"):
        pytest.skip("unshare/nsenter (util-linux) not installed")
    cfg = yaml.safe_load(LOCAL_YAML.read_text())
    head_ip, (worker_ip,) = cfg["provider"]["head_ip"], cfg["provider"]["worker_ips"]
    head_cmd = _ray_start_command(cfg["head_start_ray_commands"])
    assert BOOTSTRAP_FLAG in head_cmd
    head_flags = _flags(head_cmd)
    worker_flags = _flags(_ray_start_command(cfg["worker_start_ray_commands"]))
    head_res, worker_res = json.loads(head_flags["resources"]), json.loads(worker_flags["resources"])
    head_auth = _env_prefix(head_cmd)
    assert head_auth.get("RAY_AUTH_MODE") == "token" and head_auth.get("RAY_AUTH_TOKEN_PATH")
    assert _env_prefix(_ray_start_command(cfg["worker_start_ray_commands"])) == head_auth

    from ray.autoscaler._private.util import with_head_node_ip

    tmp = Path(tempfile.mkdtemp(prefix="musiclora-cluster-", dir="/tmp"))  # short: Ray's socket paths live under it
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no RAY_ADDRESS, and no
    env.update(PATH=f"{bin_dir}:{env.get('PATH', '')}", RAY_TMPDIR=str(tmp))  # ..._OSX_CLUSTER=0: it refuses workers
    home = tmp / "home"  # the nodes' and clients' home: only a stale default token in it
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    env["HOME"] = str(home)
    client_env = {**env, "RAY_AUTH_MODE": "token",
                  "RAY_AUTH_TOKEN_PATH": head_auth["RAY_AUTH_TOKEN_PATH"].replace("$HOME", str(home))}
    groups: list[int] = []
    ns = Netns()
    try:
        head_env = {**env, "SSH_CONNECTION": f"{head_ip} 22 {head_ip} 22"}
        head_commands = [*cfg["initialization_commands"], *cfg["setup_commands"], *cfg["head_setup_commands"],
                         *[c.replace(BOOTSTRAP_FLAG, "") for c in cfg["head_start_ray_commands"]]]
        _run_launcher_commands(ns, head_commands, head_env, tmp / "head.log", groups)

        worker_env = {**env, "SSH_CONNECTION": f"{head_ip} 22 {worker_ip} 22"}
        worker_commands = [*cfg["initialization_commands"], *cfg["setup_commands"], *cfg["worker_setup_commands"],
                           *with_head_node_ip(cfg["worker_start_ray_commands"], head_ip)]
        _run_launcher_commands(ns, worker_commands, worker_env, tmp / "worker.log", groups)

        dashboard = f"http://{head_ip}:{head_flags['dashboard-port']}"
        stale = subprocess.run([*ns.prefix, "ray", "job", "list", "--address", dashboard],
                               env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True,
                               timeout=120, check=False)
        submit = f"ray job submit --address {dashboard} -- python {shlex.quote(str(PROBE))} " + " ".join(
            [*head_res, *worker_res])
        job = subprocess.run([*ns.prefix, "bash", "-c", submit], env=client_env, capture_output=True, text=True,
                             timeout=300, check=False)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        (line,) = [ln for ln in job.stdout.splitlines() if ln.startswith("PROBE ")]
        probe = json.loads(line.removeprefix("PROBE "))
    finally:
        for pgid in reversed(groups):
            _stop_group(pgid)
        ns.close()
        shutil.rmtree(tmp, ignore_errors=True)

    assert stale.returncode != 0 and "Invalid authentication token" in stale.stderr, stale.stdout + stale.stderr
    assert probe["alive"] == sorted([head_ip, worker_ip])
    assert probe["ran_on"] == {**{r: head_ip for r in head_res}, **{r: worker_ip for r in worker_res}}
    expected_cpus = float(head_flags["num-cpus"]) + float(worker_flags["num-cpus"])
    assert probe["resources"]["CPU"] == expected_cpus
    assert all(probe["resources"][r] == v for r, v in {**head_res, **worker_res}.items())
    assert probe["transfer_sum"] == sum(range(1_000_000))
    assert not any(_group_alive(g) for g in groups)
