"""URL parsing, joining, settings and fsspec options (no server)."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest
from pydantic import ValidationError

from musiclora.storage import (
    StoreSettings,
    bucket_of,
    get_fs,
    join_url,
    open_url,
    pyarrow_fs,
    split_url,
    storage_options,
)
from musiclora.store import StorePorts

SETTINGS = StoreSettings(
    endpoint_url="http://127.0.0.1:9000", access_key="ak", secret_key="sk", region="eu-west-1"
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://bucket/a/b.tar", ("s3", "bucket/a/b.tar")),
        ("s3://bucket/prefix/", ("s3", "bucket/prefix")),
        ("s3://bucket", ("s3", "bucket")),
        ("S3://bucket/k", ("s3", "bucket/k")),
        ("file:///data/x.wav", ("file", "/data/x.wav")),
        ("/data/x.wav", ("file", "/data/x.wav")),
        ("memory://scratch/x", ("memory", "scratch/x")),
    ],
)
def test_split_url(url: str, expected: tuple[str, str]) -> None:
    assert split_url(url) == expected


def test_relative_paths_become_absolute(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert split_url("shards/0.tar") == ("file", str(tmp_path / "shards/0.tar"))
    assert split_url("file://shards") == ("file", str(tmp_path / "shards"))


@pytest.mark.parametrize("url", ["", "s3://", "s3:///key"])
def test_split_url_rejects_empty_and_bucketless(url: str) -> None:
    with pytest.raises(ValueError, match="bucket|empty"):
        split_url(url)


def test_bucket_of() -> None:
    assert bucket_of("s3://my-bucket/runs/1") == "my-bucket"
    with pytest.raises(ValueError, match="not an s3:// URL"):
        bucket_of("/local/path")


@pytest.mark.parametrize(
    ("base", "parts", "expected"),
    [
        ("s3://b/runs/", ("x", "y/z.json"), "s3://b/runs/x/y/z.json"),
        ("s3://b", ("/lead/", "trail/"), "s3://b/lead/trail"),
        ("s3://", ("bucket", "k"), "s3://bucket/k"),
        ("file:///data", ("a", "b.wav"), "file:///data/a/b.wav"),
        ("relative/dir", ("a",), "relative/dir/a"),
        ("/abs", ("./a", "", "b"), "/abs/a/b"),
        ("s3://b/k", (), "s3://b/k"),
    ],
)
def test_join_url(base: str, parts: tuple[str, ...], expected: str) -> None:
    assert join_url(base, *parts) == expected


@pytest.mark.parametrize("part", ["s3://other/k", "../escape", "a/../../b"])
def test_join_url_rejects_urls_and_parent_segments(part: str) -> None:
    with pytest.raises(ValueError):
        join_url("s3://b/base", part)


def test_settings_from_env_prefers_service_endpoint() -> None:
    env = {
        "AWS_ENDPOINT_URL": "http://generic:1",
        "AWS_ENDPOINT_URL_S3": "http://s3only:2/",
        "AWS_ACCESS_KEY_ID": "ak",
        "AWS_SECRET_ACCESS_KEY": "sk",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }
    s = StoreSettings.from_env(env)
    assert (s.endpoint_url, s.access_key, s.secret_key, s.region) == (
        "http://s3only:2",
        "ak",
        "sk",
        "eu-west-1",
    )
    assert StoreSettings.from_env({"AWS_ENDPOINT_URL": ""}) == StoreSettings()


def test_settings_validation() -> None:
    with pytest.raises(ValidationError, match="both access_key and secret_key"):
        StoreSettings(access_key="only-one")
    with pytest.raises(ValidationError, match="http://host:port"):
        StoreSettings(endpoint_url="localhost:9000")
    assert "sk" not in repr(SETTINGS)


def test_storage_options() -> None:
    assert storage_options("/tmp/x", SETTINGS) == {}
    assert storage_options("file:///tmp/x", SETTINGS) == {}
    assert storage_options("s3://b/k", SETTINGS) == {
        "key": "ak",
        "secret": "sk",
        "client_kwargs": {"region_name": "eu-west-1", "endpoint_url": "http://127.0.0.1:9000"},
        "config_kwargs": {"s3": {"addressing_style": "path"}},
    }
    assert storage_options("s3://b/k", StoreSettings()) == {"client_kwargs": {"region_name": "us-east-1"}}


def test_get_fs_and_open_url_local(tmp_path) -> None:
    url = f"file://{tmp_path}/new/dir/x.txt"
    with open_url(url, "w") as f:  # parent folders are created
        f.write("hello")
    fs, path = get_fs(url)
    assert fs.protocol[0] == "file" and path == str(tmp_path / "new/dir/x.txt")
    with open_url(str(tmp_path / "new/dir/x.txt"), "r") as f:
        assert f.read() == "hello"
    fs, path = get_fs("s3://b/k", SETTINGS)
    assert "s3" in fs.protocol and path == "b/k"


def test_pyarrow_fs_local_roundtrip(tmp_path) -> None:
    fs, path = pyarrow_fs(f"file://{tmp_path}/ckpt")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "ckpt")
    fs.create_dir(path)
    with fs.open_output_stream(os.path.join(path, "a.bin")) as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "ckpt/a.bin").read_bytes() == b"\x00\x01"


def test_pyarrow_fs_s3_uses_endpoint() -> None:
    fs, path = pyarrow_fs("s3://b/runs", SETTINGS)
    assert isinstance(fs, pafs.S3FileSystem) and path == "b/runs"
    assert fs.region == "eu-west-1"


def test_store_ports_layout() -> None:
    ports = StorePorts.from_s3_port(12000).all_ports()
    assert ports["s3"] == 12000 and ports["admin"] == 12004 and ports["master.grpc"] == 22001
    assert len(set(ports.values())) == 10
    with pytest.raises(ValidationError):
        StorePorts.from_s3_port(60000)  # gRPC port would exceed 65535
