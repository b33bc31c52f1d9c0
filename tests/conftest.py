"""Shared pytest fixtures. Keep one section per concern; integration tests use
`@pytest.mark.integration` (registered in pyproject.toml)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from musiclora.storage import ensure_bucket
from musiclora.store import EmbeddedStore, find_free_s3_port

# --------------------------------------------------------------------------- object store


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStore]:
    """A real SeaweedFS S3 server on loopback (free ports, tmp data dir) for the whole session."""
    store = EmbeddedStore(
        tmp_path_factory.mktemp("s3_store"),
        s3_port=find_free_s3_port(),
        access_key="test-access",
        secret_key="test-secret",
    )
    store.start(timeout_s=60)
    try:
        yield store
    finally:
        store.stop()


@pytest.fixture
def s3_env(s3_store: EmbeddedStore, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point this test's AWS_* environment at `s3_store`; returns the variables set."""
    env = s3_store.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def s3_bucket_url(s3_env: dict[str, str]) -> str:
    """`s3://<fresh bucket>` in `s3_store`, created for this test (env already set)."""
    url = f"s3://test-{uuid.uuid4().hex[:12]}"
    ensure_bucket(url)
    return url


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="session")
def tiny_musicgen_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny MusicGen-Melody written as a save_pretrained folder (loadable by plain transformers)."""
    from musiclora.models.families import get_family

    return get_family("musicgen-melody").save_tiny(str(tmp_path_factory.mktemp("tiny_musicgen")))


@pytest.fixture(scope="session")
def tiny_audioldm2_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny AudioLDM2 written as a save_pretrained folder (loadable by plain diffusers)."""
    from musiclora.models.families import get_family

    return get_family("audioldm2").save_tiny(str(tmp_path_factory.mktemp("tiny_audioldm2")))


@pytest.fixture(scope="session")
def tiny_stable_audio_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Stable Audio Open written as a save_pretrained folder (loadable by plain diffusers)."""
    from musiclora.models.families import get_family

    return get_family("stable-audio-open").save_tiny(str(tmp_path_factory.mktemp("tiny_stable_audio")))


# --------------------------------------------------------------------------- Ray


def _free_port_block(width: int = 3) -> int:
    """A base port P with P..P+width-1 free on 127.0.0.1."""
    import random
    import socket

    for _ in range(200):
        base = random.randint(23000, 29000)
        try:
            socks = []
            for p in range(base, base + width):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block on 127.0.0.1")


def _start_local_ray(state_dir, s3_store: EmbeddedStore, num_cpus: int, extra_env: dict[str, str] | None = None):
    """A `LocalRay` head on free pinned ports whose processes reach `s3_store` and run on CPU.

    Token auth uses the head's own token file (RAY_AUTH_TOKEN_PATH), never `~/.ray/auth_token`.
    """
    import os
    from pathlib import Path

    from musiclora.local_ray import LocalRay

    repo = Path(__file__).resolve().parents[1]
    head = LocalRay(state_dir, gcs_port=_free_port_block(1), dashboard_port=_free_port_block(3), num_cpus=num_cpus)
    ext = os.environ.get("TORCH_EXTENSIONS_DIR", str(repo / ".musiclora" / "torch_extensions"))
    return head.start(extra_env={**s3_store.env(), "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": ext,
                                 "PYTHONPATH": str(repo / "src"), "TOKENIZERS_PARALLELISM": "false",
                                 **(extra_env or {})})


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory, s3_store: EmbeddedStore):
    """A real single-host Ray head on 127.0.0.1 (pinned free ports, token auth), reaching `s3_store`.

    Every Ray process inherits the store's AWS_* variables and DS_ACCELERATOR=cpu. Stopped by PID.
    """
    head = _start_local_ray(tmp_path_factory.mktemp("ray"), s3_store, num_cpus=5)
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture
def two_cpu_ray(tmp_path_factory: pytest.TempPathFactory, s3_store: EmbeddedStore):
    """A second Ray head advertising 2 CPUs (a 2-core machine), for this test only; stopped by PID.

    Ray Train's worker-group start timeout is 10 s here (Ray's default 60 s), so a trial that
    cannot get its workers fails within the test's time.
    """
    head = _start_local_ray(tmp_path_factory.mktemp("ray2"), s3_store, num_cpus=2,
                            extra_env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"})
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture
def ray_driver(ray_cluster, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    """`ray.init` in this test process, connected to `ray_cluster`; shut down afterwards.

    The auth and address variables are set before `import ray`: Ray reads them at import.
    """
    for name, value in ray_cluster.env().items():
        if name != "RAY_ADDRESS":
            monkeypatch.setenv(name, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    import ray

    ray.init(address=ray_cluster.address)
    try:
        yield ray_cluster
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- work in progress

# Test files of work that was not yet seen green on main when it was submitted. They are kept out
# of `make test` (CI) and run with `make test-wip`; an issue whose checks live here is not closed.
WIP_FILES: set[str] = set()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in WIP_FILES:
            item.add_marker(pytest.mark.wip)
