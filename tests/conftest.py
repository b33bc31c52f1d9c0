"""Shared pytest fixtures. Keep one section per concern; integration tests use
`@pytest.mark.integration` (registered in pyproject.toml)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from musiclora.storage import EmbeddedStore, ensure_bucket, find_free_s3_port

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
