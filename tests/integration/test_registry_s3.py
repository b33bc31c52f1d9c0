"""The adapter registry on the real S3 server: concurrent publishes never share a version number."""

from __future__ import annotations

import pytest

from musiclora.adapter_registry import Registry
from tests.serve_helpers import make_random_adapter
from tests.unit.test_adapter_registry import _publish_concurrently

pytestmark = pytest.mark.integration


def test_eight_concurrent_publishes_on_s3_get_eight_versions(s3_bucket_url, tmp_path):
    source = make_random_adapter("tiny", str(tmp_path / "adapter"), 1)
    reg = Registry(f"{s3_bucket_url}/registry")
    versions = _publish_concurrently(reg, source, "lofi", 8)
    assert sorted(versions) == list(range(1, 9))
    assert reg.versions("musicgen-melody", "lofi") == list(range(1, 9))
    assert reg.publish(source, "lofi").version == 9
