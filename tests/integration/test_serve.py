"""`serve run serve/config.yaml` on a real Ray cluster with the real S3 registry, called over real HTTP.

Two train-free adapters (random LoRA B on the tiny MusicGen-Melody) are published to the registry;
the application runs from the shipped config (ports, registry, limits and faster autoscaling
delays overridden), with all of its models: MusicGen-Melody, AudioLDM2 and Stable Audio Open on
their tiny bases. Checked: the same seed gives different audio for adapters A and B, the base
request gives exactly the base model's audio, an adapter of each diffusion family is routed to its
family's model and gives that family's audio, bad input is a 4xx, and a bounded burst from 8
clients finishes without a 5xx while the model deployment scales 1 -> 2 -> 1.
"""

from __future__ import annotations

import base64
import collections
import functools
import socket
import threading
import time
import uuid

import httpx
import numpy as np
import pytest
import soundfile as sf
import yaml

from musiclora.adapter_registry import Registry
from musiclora.client import ServiceClient, ServiceError, generate_to_file
from musiclora.models.families import get_family
from musiclora.storage import ensure_bucket
from serve.deploy import ServeRun, replicas, write_config
from tests.serve_helpers import make_random_adapter, reference_audio, wav_bytes_to_array

pytestmark = pytest.mark.integration

KEY = "integration-key"
MODEL = "Model-musicgen-melody"
MIN_REQUESTS, MAX_REQUESTS, MAX_LOAD_S, CLIENTS = 60, 200, 240.0, 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(ray_cluster, s3_store, tiny_musicgen_dir, tiny_audioldm2_dir, tiny_stable_audio_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in s3_store.env().items():
            mp.setenv(name, value)
        bases = {"audioldm2": tiny_audioldm2_dir, "stable-audio-open": tiny_stable_audio_dir}
        bucket = f"s3://serve-{uuid.uuid4().hex[:10]}"
        ensure_bucket(bucket)
        registry = Registry(f"{bucket}/registry")
        dirs = {}
        for seed, name in ((1, "alpha"), (2, "beta")):
            dirs[name] = make_random_adapter(tiny_musicgen_dir, str(tmp / name), seed)
            registry.publish(dirs[name], name)
        config = write_config(
            tmp / "config.yaml", _free_port(),
            args={"registry_url": registry.url, "api_key_env": "MUSICLORA_TEST_API_KEY",
                  "models": [{"name": "musicgen-melody", "family": "musicgen-melody", "base": tiny_musicgen_dir,
                              "max_adapters": 2, "max_batch_size": 4, "torch_threads": 1},
                             *({"name": family, "family": family, "base": base, "max_adapters": 1,
                                "torch_threads": 1} for family, base in bases.items())],
                  "limits": {"max_duration_s": 4, "max_upload_bytes": 100_000, "max_pending": 64}},
            deployments={MODEL: {"autoscaling_config": {"upscale_delay_s": 1, "downscale_delay_s": 6,
                                                        "look_back_period_s": 2}}},
            app={"runtime_env": {"env_vars": {"MUSICLORA_TEST_API_KEY": KEY}}},
        )
        env = {k: v for k, v in ray_cluster.env().items() if k != "RAY_ADDRESS"}
        # every model of the shipped config is served (its deployments come with it)
        assert {m["name"] for m in yaml.safe_load(config.read_text())["applications"][0]["args"]["models"]} == {
            MODEL.removeprefix("Model-"), *bases}
        run = ServeRun(config, ray_cluster.address, env={**env, **s3_store.env()}).start(timeout_s=400)
        try:
            token = ray_cluster.token_file.read_text().strip()
            watch = functools.partial(replicas, ray_cluster.dashboard_url, token, MODEL)
            deadline = time.monotonic() + 300
            while watch()["states"] != {"RUNNING": 1} and time.monotonic() < deadline:
                time.sleep(1)
            yield {"url": run.url, "dirs": dirs, "base": tiny_musicgen_dir, "watch": watch, "registry": registry,
                   "bases": bases, "tmp": tmp, "token": token, "dashboard": ray_cluster.dashboard_url}
        finally:
            run.stop()


def _post(url: str, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}", **kwargs.pop("headers", {})}
    return httpx.post(url + "/v1/generate", headers=headers, timeout=120, trust_env=False, **kwargs)


def test_adapters_change_the_audio_and_the_base_stays_the_base(service):
    client = ServiceClient(service["url"], api_key=KEY)
    assert {a["name"] for a in client.adapters()["adapters"]} == {"alpha", "beta"}
    clips = {name: client.generate("slow strings", adapter=name, duration_s=0.5, seed=11)
             for name in ("alpha", "beta", None)}
    audio = {name: wav_bytes_to_array(c.audio)[0] for name, c in clips.items()}
    assert clips["alpha"].params["adapter"] == "alpha@1" and clips[None].params["adapter"] == "none"
    assert clips["alpha"].params["seed"] == "11" and clips["alpha"].params["sample-rate"] == "32000"
    # the replica runs torch on 1 thread, this process on several: float sums may differ in the last bit,
    # which moves a few 16-bit samples by one step (the tokens are the same)
    same = {"rtol": 0, "atol": 2 / 32768}
    for x, y in (("alpha", "beta"), ("alpha", None), ("beta", None)):  # different tokens: most samples move
        assert np.mean(np.abs(audio[x] - audio[y]) > same["atol"]) > 0.5, (x, y)
    np.testing.assert_allclose(audio[None], reference_audio(service["base"], None, "slow strings", 0.5, 11), **same)
    np.testing.assert_allclose(
        audio["alpha"], reference_audio(service["base"], service["dirs"]["alpha"], "slow strings", 0.5, 11), **same)


def test_client_writes_a_clip_with_a_melody_upload(service, tmp_path):
    melody = tmp_path / "melody.wav"
    sf.write(melody, 0.3 * np.sin(2 * np.pi * 330 * np.arange(16_000) / 16_000), 16_000)
    info = generate_to_file(service["url"], "a hummed tune", tmp_path / "out.wav", api_key=KEY, adapter="beta",
                            duration_s=0.3, seed=2, melody=melody)
    assert info["melody"] == "yes" and info["adapter"] == "beta@1" and info["seed"] == "2"
    audio, sr = sf.read(tmp_path / "out.wav")
    assert sr == 32_000 and len(audio) == int(0.3 * sr) and audio.ndim == 1 and info["channels"] == "1"


def test_bad_input_is_a_4xx_and_the_service_keeps_serving(service):
    url = service["url"]
    cases = [
        ({"json": {"prompt": "x", "adapter": "nope"}}, 404),
        ({"json": {"prompt": "x", "adapter": "../alpha"}}, 422),
        ({"json": {"prompt": "x", "adapter": "s3://other/registry/alpha"}}, 422),
        ({"content": b"{oops", "headers": {"content-type": "application/json"}}, 400),
        ({"json": {"prompt": "x", "seed": "one"}}, 422),
        ({"json": {"prompt": "x", "duration_s": 60}}, 422),
        ({"json": {"prompt": "x", "melody_b64": base64.b64encode(b"not audio at all" * 10).decode()}}, 415),
        ({"data": {"prompt": "x"}, "files": {"melody": ("m.wav", b"\0" * 120_000, "audio/wav")}}, 413),
    ]
    for kwargs, status in cases:
        r = _post(url, **kwargs)
        assert r.status_code == status, (kwargs, r.text)
        assert r.json()["detail"]
    assert httpx.post(url + "/v1/generate", json={"prompt": "x"}, trust_env=False).status_code == 401
    with pytest.raises(ServiceError) as err:
        ServiceClient(url, api_key="wrong").generate("x")
    assert err.value.status == 401
    assert _post(url, json={"prompt": "still here", "duration_s": 0.2, "adapter": "beta"}).status_code == 200


@pytest.mark.parametrize("family, sample_rate", [("audioldm2", 16_000), ("stable-audio-open", 44_100)])
def test_an_adapter_of_each_diffusion_family_runs_on_its_model(service, family, sample_rate):
    """The adapter is routed to its family's deployment (by its card), changes the audio, and the served
    clip is what the family gives in process with the same adapter, seed and steps; a melody upload to
    these text-only families is a 422 with the family's reason."""
    base, name = service["bases"][family], f"{family}-a"
    adapter_dir = make_random_adapter(base, str(service["tmp"] / name), 3, family=family)
    service["registry"].publish(adapter_dir, name)
    deadline = time.monotonic() + 120
    watch = functools.partial(replicas, service["dashboard"], service["token"], f"Model-{family}")
    while watch()["states"] != {"RUNNING": 1} and time.monotonic() < deadline:
        time.sleep(1)
    client = ServiceClient(service["url"], api_key=KEY)
    ask = {"duration_s": 0.5, "seed": 7, "steps": 2}
    clips = {"adapter": client.generate("slow strings", adapter=name, **ask),
             "base": client.generate("slow strings", model=family, **ask)}
    for clip in clips.values():
        assert clip.params["family"] == family and clip.params["model"] == family, clip.params
        assert clip.params["sample-rate"] == str(sample_rate) and clip.params["steps"] == "2"
    assert clips["adapter"].params["adapter"] == f"{name}@1" and clips["base"].params["adapter"] == "none"
    audio = {k: wav_bytes_to_array(c.audio) for k, c in clips.items()}  # [L] or [C, L], as the family gives it
    channels = get_family(family).channels  # 1, or 2 for Stable Audio Open: the served WAV keeps them
    assert all(sr == sample_rate and a.shape[-1] == sample_rate // 2 and (a.ndim == 1) == (channels == 1)
               for a, sr in audio.values())
    assert all(c.params["channels"] == str(channels) and c.params["audio-duration-s"] == "0.500" for c in clips.values())
    if channels == 2:
        assert audio["base"][0].shape[0] == 2 and np.abs(audio["base"][0][0] - audio["base"][0][1]).max() > 1e-3
    assert np.mean(np.abs(audio["adapter"][0] - audio["base"][0]) > 2 / 32768) > 0.5  # the adapter moves most samples
    want = reference_audio(base, adapter_dir, "slow strings", 0.5, 7, family=family, steps=2)
    np.testing.assert_allclose(audio["adapter"][0], want, rtol=0, atol=2 / 32768)
    r = _post(service["url"], json={"prompt": "x", "model": family, "melody_b64": base64.b64encode(clips["base"].audio)
                                    .decode()})
    assert r.status_code == 422 and "text only" in r.json()["detail"], r.text


def test_burst_scales_up_and_back_without_5xx(service):
    """8 clients, at least 60 requests (more, up to 200 / 240 s, only while the 2nd replica is not up yet)."""
    watch, url = service["watch"], service["url"]
    assert watch()["states"] == {"RUNNING": 1}
    codes: collections.Counter[int] = collections.Counter()
    seen: list[dict] = []  # replica states, one per second
    lock, sent, scaled = threading.Lock(), [0], threading.Event()
    start = time.monotonic()

    def client(i: int) -> None:
        while True:
            with lock:
                enough = sent[0] >= MIN_REQUESTS and (scaled.is_set() or sent[0] >= MAX_REQUESTS)
                if enough or time.monotonic() - start > MAX_LOAD_S:
                    return
                sent[0] += 1
                n = sent[0]
            r = _post(url, json={"prompt": "burst", "duration_s": 1.0, "seed": n,
                                 "adapter": ("alpha", "beta", None)[n % 3]})
            with lock:
                codes[r.status_code] += 1

    def monitor() -> None:
        while not done.is_set():
            state = watch()
            seen.append(state)
            if state["states"].get("RUNNING", 0) >= 2:
                scaled.set()
            time.sleep(1)

    done = threading.Event()
    mon = threading.Thread(target=monitor)
    mon.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    load_s = time.monotonic() - start
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and watch()["states"] != {"RUNNING": 1}:
        time.sleep(2)
    done.set()
    mon.join()
    final = watch()
    changes = [s for i, s in enumerate(seen) if i == 0 or s != seen[i - 1]]
    print(f"burst: {dict(codes)} in {load_s:.0f} s; replica states (1 s apart) on change: {changes}")
    assert sum(codes.values()) >= MIN_REQUESTS
    assert not [c for c in codes if c >= 500], codes
    assert codes[200] >= MIN_REQUESTS * 0.9, codes
    assert any(s["states"].get("RUNNING", 0) == 2 for s in seen), seen
    assert final["states"] == {"RUNNING": 1}, (final, seen[-5:])
