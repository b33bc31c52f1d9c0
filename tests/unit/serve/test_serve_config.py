"""serve/config.yaml is a valid Serve config whose args build the app; ModelHost keeps queued adapters."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from musiclora.adapter_registry import AdapterNotFoundError, Registry
from serve.app import INGRESS, MODEL_PREFIX, AppArgs, build_app
from serve.deploy import CONFIG, write_config
from serve.host import GenParams, ModelHost
from tests.serve_helpers import make_random_adapter


def test_shipped_config_validates_and_builds():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(CONFIG.read_text())
    ServeDeploySchema.model_validate(config)
    [app] = config["applications"]
    args = AppArgs.model_validate(app["args"])
    names = {d["name"] for d in app["deployments"]}
    assert names == {INGRESS} | {MODEL_PREFIX + m.name for m in args.models}
    for dep in app["deployments"]:
        auto = dep.get("autoscaling_config")
        if auto:  # delays short enough for a burst of a few seconds
            assert auto["upscale_delay_s"] <= 5 and auto["look_back_period_s"] <= 10 and auto["max_replicas"] >= 2
            assert dep["max_ongoing_requests"] >= args.models[0].max_batch_size and dep["max_queued_requests"] > 0
    assert build_app(app["args"]) is not None
    assert config["http_options"]["host"] == "127.0.0.1"


@pytest.mark.parametrize("bad, key", [
    ({"models": []}, "models"),
    ({"models": [{"name": "../x", "family": "musicgen-melody", "base": "tiny"}]}, "name"),
    ({"limits": {"max_duration_s": -1}}, "max_duration_s"),
    ({"limits": {"max_pending": 0}}, "max_pending"),
    ({"nope": 1}, "nope"),
])
def test_bad_args_fail_before_deploying_naming_the_key(bad, key):
    args = {**yaml.safe_load(CONFIG.read_text())["applications"][0]["args"], **bad}
    with pytest.raises(ValidationError, match=key):
        build_app(args)


def test_write_config_merges_overrides(tmp_path):
    path = write_config(tmp_path / "c.yaml", 34567, args={"limits": {"max_pending": 3}},
                        deployments={"Model-musicgen-melody": {"autoscaling_config": {"downscale_delay_s": 4}}},
                        app={"runtime_env": {"env_vars": {"K": "v"}}})
    app = yaml.safe_load(path.read_text())["applications"][0]
    assert app["args"]["limits"]["max_pending"] == 3 and app["args"]["limits"]["max_duration_s"] == 30
    model = next(d for d in app["deployments"] if d["name"] == "Model-musicgen-melody")
    assert model["autoscaling_config"]["downscale_delay_s"] == 4 and model["autoscaling_config"]["max_replicas"] == 2
    assert app["runtime_env"] == {"env_vars": {"K": "v"}}
    only = write_config(tmp_path / "one.yaml", 34567, args={"models": [{"name": "m", "family": "audioldm2",
                                                                       "base": "tiny"}]})
    deployments = [d["name"] for d in yaml.safe_load(only.read_text())["applications"][0]["deployments"]]
    assert deployments == [INGRESS]  # the shipped models' deployments go with their models


def test_host_keeps_an_evicted_adapter_until_its_queued_requests_ran(tmp_path):
    reg = Registry(str(tmp_path / "registry"))
    reg.publish(make_random_adapter("tiny", str(tmp_path / "a"), 3), "a")
    host = ModelHost("musicgen-melody", "tiny", reg.url, torch_threads=1)

    def run(items):
        return host.executor.submit(host.run, items).result()

    host.load_blocking("a@1")
    host.hold("a@1")
    host.uncache("a@1")  # the LRU lets go while a request is queued
    host.executor.submit(lambda: None).result()  # let any detach run
    assert host.attached() == ["a@1"]
    params = GenParams("calm", duration_s=0.2, seed=1)
    [with_a, base] = run([("a@1", params), (None, params)])
    assert with_a.adapter == "a@1" and base.adapter is None and with_a.batch_size == 2
    assert host.attached() == []  # detached once its last request ran
    with pytest.raises(AdapterNotFoundError):
        host.hold("a@1")
    # one batched generation for all four, rows with and without the adapter
    host.load_blocking("a@1")
    for _ in range(3):
        host.hold("a@1")
    out = run([("a@1", params), (None, params), ("a@1", params), ("a@1", params)])
    assert [r.batch_size for r in out] == [4, 4, 4, 4]
    a_audio = [np.frombuffer(r.audio, np.uint8) for r in out]
    assert np.array_equal(a_audio[0], a_audio[2]) and not np.array_equal(a_audio[0], a_audio[1])
    with pytest.raises(AdapterNotFoundError):
        host.fetch("missing@1")


@pytest.mark.parametrize("bad, key", [({"device": "gpu"}, "device"), ({"dtype": "float64"}, "dtype")])
def test_model_device_and_dtype_are_checked_before_deploying(bad, key):
    args = yaml.safe_load(CONFIG.read_text())["applications"][0]["args"]
    args["models"] = [{**args["models"][0], **bad}]
    with pytest.raises(ValidationError, match=key):
        build_app(args)


def test_host_puts_the_model_on_its_device_and_dtype(tmp_path):
    import torch

    host = ModelHost("musicgen-melody", "tiny", str(tmp_path / "registry"), torch_threads=1, device="cpu",
                     dtype="bfloat16")
    params = {p.device.type for p in host.loaded.model.parameters()}, {p.dtype for p in host.loaded.model.parameters()}
    assert params == ({"cpu"}, {torch.bfloat16}) and host.device == torch.device("cpu")
    with pytest.raises(ValueError, match="expected cpu, cuda or cuda:N"):
        ModelHost("musicgen-melody", "tiny", str(tmp_path / "registry"), device="tpu")


def test_api_key_fails_closed(monkeypatch):
    """An `api_key_env` naming an unset or blank variable stops the ingress from starting; only
    `api_key_env: null` gives an open endpoint."""
    from serve.app import MissingApiKeyError, ingress_settings, read_api_key

    args = yaml.safe_load(CONFIG.read_text())["applications"][0]["args"]
    assert AppArgs.model_validate(args).api_key_env == "MUSICLORA_API_KEY"
    settings = {"models": [{"name": "m", "family": "musicgen-melody", "base": "tiny"}]}
    for value in (None, "", "   "):
        if value is None:
            monkeypatch.delenv("MUSICLORA_H6_KEY", raising=False)
        else:
            monkeypatch.setenv("MUSICLORA_H6_KEY", value)
        with pytest.raises(MissingApiKeyError, match=r"MUSICLORA_H6_KEY.*api_key_env: null"):
            ingress_settings(settings, "MUSICLORA_H6_KEY")
    monkeypatch.setenv("MUSICLORA_H6_KEY", "k1")
    assert ingress_settings(settings, "MUSICLORA_H6_KEY").api_key.get_secret_value() == "k1"
    assert read_api_key(None) is None and ingress_settings(settings, None).api_key is None
    with pytest.raises(ValidationError, match="api_key_env"):
        AppArgs.model_validate({**args, "api_key_env": ""})


def test_host_runs_slot_and_peft_adapters_in_one_batch(tmp_path):
    """One slot: the first adapter goes into it, the second through peft's load_adapter; a batch
    with both and the base gives each request its reference audio; a freed slot is reused."""
    from tests.serve_helpers import reference_audio, wav_bytes_to_array

    reg = Registry(str(tmp_path / "registry"))
    dirs = [make_random_adapter("tiny", str(tmp_path / n), s) for n, s in (("a", 3), ("b", 4))]
    reg.publish(dirs[0], "a")
    reg.publish(dirs[1], "b")
    host = ModelHost("musicgen-melody", "tiny", reg.url, torch_threads=1, lora_slots=1)
    host.load_blocking("a@1")
    host.load_blocking("b@1")
    assert host.slots.free_count() == 0 and host._attached["a@1"].internal == "slot0"
    assert host._attached["b@1"].internal != "slot0"  # peft's own named adapter
    params = GenParams("calm", duration_s=0.2, seed=1)
    host.hold("a@1")
    host.hold("b@1")
    out = host.executor.submit(host.run, [("a@1", params), ("b@1", params), (None, params)]).result()
    for r, folder in zip(out, [dirs[0], dirs[1], None]):
        np.testing.assert_allclose(wav_bytes_to_array(r.audio)[0], reference_audio("tiny", folder, "calm", 0.2, 1),
                                   atol=2 / 32768)
    host.uncache("a@1")
    host.executor.submit(lambda: None).result()
    assert host.slots.free_count() == 1 and host.attached() == ["b@1"]
    host.load_blocking("a@1")
    assert host._attached["a@1"].internal == "slot0"
