"""Adapter registry on a local folder: publish, versions, latest pointer, promote, reference safety, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from musiclora.adapter_registry import (
    MARKER,
    POINTER,
    AdapterNotFoundError,
    AdapterRef,
    InvalidReferenceError,
    Registry,
    parse_ref,
)
from musiclora.cli.adapters import app as adapters_app
from tests.serve_helpers import make_random_adapter


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("adapters")
    return [make_random_adapter("tiny", str(root / f"a{seed}"), seed) for seed in (1, 2)]


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("ref, expected", [
    ("lofi", AdapterRef("lofi")), ("lofi@3", AdapterRef("lofi", 3)), ("lofi@latest", AdapterRef("lofi")),
    ("a.b_c-9", AdapterRef("a.b_c-9")),
])
def test_parse_ref_accepts_names_and_versions(ref, expected):
    assert parse_ref(ref) == expected


@pytest.mark.parametrize("ref", [
    "../lofi", "..", ".", "lofi/../../x", "/etc/passwd", "s3://bucket/x", "file:///tmp/x", "a/b", "a\\b",
    "lofi@0", "lofi@-1", "lofi@1.5", "lofi@", "@1", "", "lofi@1@2", "lo fi", "lofi%2F..", "x" * 101, "-x", "ü",
])
def test_parse_ref_rejects_path_tricks_and_bad_syntax(ref):
    with pytest.raises(InvalidReferenceError, match="adapter reference"):
        parse_ref(ref)


def test_publish_list_show_promote(tmp_path, adapter_dirs):
    reg = Registry(str(tmp_path / "registry"))
    v1 = reg.publish(adapter_dirs[0], "lofi")
    v2 = reg.publish(adapter_dirs[1], "lofi", card_updates={"metrics": {"val_loss": 1.5}})
    assert (v1.version, v2.version) == (1, 2) and v1.family == "musicgen-melody"
    assert reg.versions("musicgen-melody", "lofi") == [1, 2]
    # nothing promoted: the name alone resolves to the newest complete version
    assert reg.latest("musicgen-melody", "lofi") is None and reg.resolve("lofi").version == 2
    assert reg.promote("lofi", 1).version == 1
    assert reg.resolve("lofi").version == 1 and reg.resolve("lofi@2").version == 2
    shown = reg.show("lofi@2")
    assert shown["card"]["metrics"] == {"val_loss": 1.5} and shown["card"]["base_model"] == "tiny"
    assert shown["latest"] == 1 and shown["versions"] == [1, 2]
    assert set(shown["published"]["files"]) >= {"adapter_config.json", "adapter_model.safetensors", "card.json"}
    folder = Path(reg.version_url("musicgen-melody", "lofi", 2))
    assert (folder / "adapter_model.safetensors").read_bytes() == (Path(adapter_dirs[1]) / "adapter_model.safetensors").read_bytes()
    [entry] = reg.list()
    assert entry == {"family": "musicgen-melody", "name": "lofi", "versions": [1, 2], "latest": 1, "resolves_to": 1,
                     "base_model": "tiny"}


def test_given_version_and_immutability(tmp_path, adapter_dirs):
    reg = Registry(str(tmp_path / "registry"))
    assert reg.publish(adapter_dirs[0], "jazz", version=7).version == 7
    assert reg.publish(adapter_dirs[0], "jazz").version == 8
    with pytest.raises(ValueError, match="already has version 7"):
        reg.publish(adapter_dirs[1], "jazz", version=7)


def test_promote_of_missing_version_leaves_registry_untouched(tmp_path, adapter_dirs):
    reg = Registry(str(tmp_path / "registry"))
    reg.publish(adapter_dirs[0], "lofi", promote=True)
    before = _tree(tmp_path / "registry")
    with pytest.raises(AdapterNotFoundError, match="no version 5"):
        reg.promote("lofi", 5)
    with pytest.raises(AdapterNotFoundError, match="no adapter named 'nope'"):
        reg.promote("nope", 1)
    with pytest.raises(InvalidReferenceError):
        reg.promote("../lofi", 1)
    assert _tree(tmp_path / "registry") == before


def test_half_written_version_is_invisible(tmp_path, adapter_dirs):
    """A publish that died before its version.json: readers skip it, promote refuses it, numbering moves on."""
    reg = Registry(str(tmp_path / "registry"))
    reg.publish(adapter_dirs[0], "lofi", promote=True)
    v2 = reg.publish(adapter_dirs[1], "lofi")
    Path(v2.url, MARKER).unlink()  # as if the writer died before its last PUT
    assert reg.versions("musicgen-melody", "lofi") == [1]
    assert reg.resolve("lofi").version == 1
    with pytest.raises(AdapterNotFoundError):
        reg.resolve("lofi@2")
    with pytest.raises(AdapterNotFoundError):
        reg.promote("lofi", 2)
    assert reg.publish(adapter_dirs[1], "lofi").version == 3
    pointer = json.loads(Path(tmp_path / "registry" / "musicgen-melody" / "lofi" / POINTER).read_text())
    assert pointer["version"] == 1


def test_publish_rejects_bad_sources_and_names(tmp_path, adapter_dirs):
    reg = Registry(str(tmp_path / "registry"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "card.json").write_text("{}")
    with pytest.raises(ValueError, match="adapter_config.json"):
        reg.publish(str(tmp_path / "empty"), "x")
    with pytest.raises(FileNotFoundError):
        reg.publish(str(tmp_path / "missing"), "x")
    with pytest.raises(InvalidReferenceError, match="adapter name"):
        reg.publish(adapter_dirs[0], "../x")
    with pytest.raises(ValueError, match="card says family"):
        reg.publish(adapter_dirs[0], "x", family="audioldm")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in Path(adapter_dirs[0]).iterdir():
        (pickled / f.name).write_bytes(f.read_bytes())
    (pickled / "optimizer.pt").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="pickle files"):
        reg.publish(str(pickled), "x")
    with pytest.raises(AdapterNotFoundError):
        reg.resolve("x")


def test_names_are_unique_across_families(tmp_path, adapter_dirs):
    reg = Registry(str(tmp_path / "registry"))
    reg.publish(adapter_dirs[0], "lofi")
    (tmp_path / "registry" / "audioldm" / "other" / "1").mkdir(parents=True)
    (tmp_path / "registry" / "audioldm" / "lofi" / "1").mkdir(parents=True)  # a stray folder under another family
    with pytest.raises(ValueError, match="already used by family 'audioldm'"):
        reg.publish(adapter_dirs[1], "lofi")


def test_cli_publish_list_show_promote(tmp_path, adapter_dirs):
    runner = CliRunner()
    reg = ["--registry", str(tmp_path / "registry")]
    out = runner.invoke(adapters_app, ["publish", adapter_dirs[0], "--name", "lofi", "--promote", *reg])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["ref"] == "lofi@1"
    assert runner.invoke(adapters_app, ["publish", adapter_dirs[1], "--name", "lofi", *reg]).exit_code == 0
    listed = json.loads(runner.invoke(adapters_app, ["list", *reg]).stdout)
    assert listed[0]["versions"] == [1, 2] and listed[0]["latest"] == 1
    assert json.loads(runner.invoke(adapters_app, ["promote", "lofi", "2", *reg]).stdout)["latest"] == 2
    assert json.loads(runner.invoke(adapters_app, ["show", "lofi", *reg]).stdout)["version"] == 2
    bad = runner.invoke(adapters_app, ["promote", "lofi", "9", *reg])
    assert bad.exit_code == 2 and "no version 9" in bad.output
    bad = runner.invoke(adapters_app, ["show", "../etc", *reg])
    assert bad.exit_code == 2 and "not valid" in bad.output


def _publish_concurrently(reg: Registry, source: str, name: str, n: int) -> list[int]:
    """`n` publishes of one name at once (threads released together by a barrier); their version numbers."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    barrier = threading.Barrier(n)

    def one(_):
        barrier.wait()
        return reg.publish(source, name).version

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_concurrent_publishes_of_one_name_get_distinct_versions(tmp_path, adapter_dirs):
    reg = Registry(str(tmp_path / "registry"))
    versions = _publish_concurrently(reg, adapter_dirs[0], "lofi", 8)
    assert sorted(versions) == list(range(1, 9))
    assert reg.versions("musicgen-melody", "lofi") == list(range(1, 9))
    for v in versions:  # every version is whole: its marker lists the files that are there
        shown = reg.show(f"lofi@{v}")
        assert shown["version"] == v


def test_explicit_version_held_by_a_claim_is_refused(tmp_path, adapter_dirs):
    reg = Registry(str(tmp_path / "registry"))
    assert reg._claim("musicgen-melody", "lofi", 5)  # a publish of 5 running (or died) elsewhere
    with pytest.raises(ValueError, match="claimed by another publish"):
        reg.publish(adapter_dirs[0], "lofi", version=5)
    assert reg.publish(adapter_dirs[0], "lofi").version == 6
