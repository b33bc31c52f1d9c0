"""The storage layer against a real SeaweedFS S3 server (no mocks)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import fsspec
import pytest
from typer.testing import CliRunner

from musiclora.cli.store import app
from musiclora.storage import (
    BucketNotFoundError,
    StorageAccessDeniedError,
    StorageError,
    StoreSettings,
    StoreUnreachableError,
    ensure_bucket,
    get_fs,
    join_url,
    open_url,
    pyarrow_fs,
    storage_options,
)
from musiclora.store import EmbeddedStore, find_free_s3_port, port_is_free

pytestmark = pytest.mark.integration


def test_write_read_list_through_urls(s3_bucket_url: str) -> None:
    for i in range(3):
        with open_url(join_url(s3_bucket_url, "shards", f"{i:03d}.tar"), "wb") as f:
            f.write(bytes([i]) * 100)
    with open_url(join_url(s3_bucket_url, "shards/001.tar")) as f:
        assert f.read() == b"\x01" * 100
    fs, path = get_fs(join_url(s3_bucket_url, "shards"))
    assert [p.rsplit("/", 1)[1] for p in sorted(fs.ls(path))] == ["000.tar", "001.tar", "002.tar"]
    url = join_url(s3_bucket_url, "manifest.json")  # plain fsspec with our options works too
    with fsspec.open(url, "w", **storage_options(url)) as f:
        json.dump({"num_shards": 3}, f)
    with fsspec.open(url, "r", **storage_options(url)) as f:
        assert json.load(f) == {"num_shards": 3}


def test_wrong_keys_are_rejected(s3_store: EmbeddedStore, s3_bucket_url: str) -> None:
    with open_url(join_url(s3_bucket_url, "x"), "wb") as f:
        f.write(b"x")
    bad = s3_store.settings().model_copy(update={"secret_key": "wrong-secret"})
    with pytest.raises(StorageAccessDeniedError, match="AWS_SECRET_ACCESS_KEY") as err:
        open_url(join_url(s3_bucket_url, "x"), "rb", settings=bad)
    assert s3_store.endpoint_url in str(err.value) and isinstance(err.value, StorageError)
    with pytest.raises(StorageError, match=s3_store.endpoint_url):
        ensure_bucket("s3://other-bucket", settings=bad)
    unknown = StoreSettings(endpoint_url=s3_store.endpoint_url, access_key="nobody", secret_key="nothing")
    with pytest.raises(StorageAccessDeniedError, match="'nobody'"):
        open_url(join_url(s3_bucket_url, "x"), "rb", settings=unknown)


def test_missing_bucket_is_named_and_never_auto_created(s3_env: dict[str, str]) -> None:
    url = "s3://no-such-bucket-4242/shards/0.tar"
    with pytest.raises(BucketNotFoundError, match="'no-such-bucket-4242'.*ensure_bucket"):
        open_url(url, "rb")
    with pytest.raises(BucketNotFoundError, match="no-such-bucket-4242"):
        open_url(url, "wb")
    assert ensure_bucket(url) is True  # ... and the fix the message suggests works


def test_missing_object_is_file_not_found(s3_bucket_url: str) -> None:
    url = join_url(s3_bucket_url, "nothing/here.bin")
    with pytest.raises(FileNotFoundError, match="no object at") as err:
        open_url(url, "rb")
    assert not isinstance(err.value, BucketNotFoundError)
    assert url in str(err.value)


def test_ensure_bucket(s3_env: dict[str, str]) -> None:
    url = "s3://ensure-me/runs/1"
    assert ensure_bucket(url) is True
    assert ensure_bucket(url) is False
    with open_url(join_url(url, "ok.txt"), "wb") as f:
        f.write(b"ok")
    fs, _ = get_fs(url)
    assert fs.find("ensure-me") == ["ensure-me/runs/1/ok.txt"]
    assert ensure_bucket("file:///tmp/never-created") is False


def test_unreachable_endpoint_names_it() -> None:
    port = find_free_s3_port()
    settings = StoreSettings(endpoint_url=f"http://127.0.0.1:{port}", access_key="a", secret_key="b")
    with pytest.raises(StoreUnreachableError, match=f"127.0.0.1:{port}.*musiclora store up"):
        open_url("s3://bucket/key", "rb", settings=settings)


def test_pyarrow_fs_roundtrip(s3_bucket_url: str) -> None:
    fs, root = pyarrow_fs(join_url(s3_bucket_url, "ckpt"))
    fs.create_dir(f"{root}/epoch_0")
    with fs.open_output_stream(f"{root}/epoch_0/adapter.safetensors") as f:
        f.write(b"weights")
    with open_url(join_url(s3_bucket_url, "ckpt/epoch_0/adapter.safetensors")) as f:  # pyarrow -> fsspec
        assert f.read() == b"weights"
    with open_url(join_url(s3_bucket_url, "ckpt/card.json"), "wb") as f:  # fsspec -> pyarrow
        f.write(b"{}")
    with fs.open_input_stream(f"{root}/card.json") as f:
        assert f.read() == b"{}"
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    assert {i.path for i in infos if i.type == pafs.FileType.File} == {
        f"{root}/epoch_0/adapter.safetensors",
        f"{root}/card.json",
    }


def test_subprocess_reaches_store_through_env(s3_store: EmbeddedStore, s3_bucket_url: str) -> None:
    url = join_url(s3_bucket_url, "from-child.txt")
    code = f"from musiclora.storage import open_url\nwith open_url({url!r}, 'wb') as f: f.write(b'child')"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | s3_store.env()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    with open_url(url) as f:
        assert f.read() == b"child"


def test_start_reuses_running_store(s3_store: EmbeddedStore) -> None:
    pid = s3_store.status()["pid"]
    other_port = find_free_s3_port()
    with EmbeddedStore(
        s3_store.data_dir, other_port, access_key="test-access", secret_key="test-secret"
    ) as again:
        assert again.endpoint_url == s3_store.endpoint_url
        assert again.status()["pid"] == pid
    assert s3_store.status()["healthy"]  # leaving the reused store's context did not stop it
    with pytest.raises(StorageAccessDeniedError, match="other keys"):
        EmbeddedStore(s3_store.data_dir, access_key="x", secret_key="y").start()


def test_busy_port_is_reported(tmp_path) -> None:
    port = find_free_s3_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port + 3))
        s.listen()
        with pytest.raises(StorageError, match=f"'filer': {port + 3}"):
            EmbeddedStore(tmp_path, s3_port=port).start()


def test_start_timeout_shows_log_and_cleans_up(tmp_path, monkeypatch) -> None:
    fake = tmp_path / "fake-weed"
    fake.write_text(
        textwrap.dedent("""\
        #!/bin/sh
        echo "fake weed: cannot open volume"
        echo $$ > "$(dirname "$0")/fake.pid"
        exec sleep 60
        """)
    )
    fake.chmod(0o755)
    monkeypatch.setenv("MUSICLORA_WEED_BIN", str(fake))
    store = EmbeddedStore(tmp_path / "store", s3_port=find_free_s3_port())
    with pytest.raises(StorageError, match=r"(?s)did not answer.*within 2 s.*fake weed: cannot open volume"):
        store.start(timeout_s=2)
    assert store.status() is None and not store.state_path.exists()
    assert not _pid_running(int((tmp_path / "fake.pid").read_text())), "timed-out process left running"


def test_cli_up_status_down(tmp_path) -> None:
    data_dir, port = tmp_path / "store", find_free_s3_port()
    cli = [sys.executable, "-m", "musiclora.cli.store"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    try:
        up = subprocess.run(
            [*cli, "up", "--data-dir", str(data_dir), "--port", str(port)],
            check=False, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert up.returncode == 0, up.stderr
        exports = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines())
        assert exports["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{port}"
        assert exports["AWS_ACCESS_KEY_ID"] == "musiclora"

        runner = CliRunner()
        status = runner.invoke(app, ["status", "--data-dir", str(data_dir)])
        assert status.exit_code == 0, status.output
        state = json.loads(status.stdout)
        assert state["healthy"] and state["ports"]["s3"] == port

        settings = StoreSettings.from_env(exports)
        with open_url("s3://musiclora/hello.txt", "wb", settings=settings) as f:  # bucket made by `up`
            f.write(b"hi")

        down = runner.invoke(app, ["down", "--data-dir", str(data_dir)])
        assert down.exit_code == 0 and "stopped" in down.output
        assert all(port_is_free(p) for p in range(port, port + 5))
        assert not _pid_running(state["pid"])
        assert runner.invoke(app, ["status", "--data-dir", str(data_dir)]).exit_code == 1
        assert "no S3 store" in runner.invoke(app, ["down", "--data-dir", str(data_dir)]).output
    finally:
        EmbeddedStore(data_dir).stop()


def _pid_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
