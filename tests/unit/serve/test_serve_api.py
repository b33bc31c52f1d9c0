"""The HTTP API in process (FastAPI + real tiny MusicGen-Melody + real registry on a local folder).

Every kind of bad input gets its 4xx with a reason and the service keeps serving; adapters
change the audio, the base request gives exactly the base model's audio.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from musiclora.adapter_registry import Registry
from musiclora.client import Clip
from serve.api import ApiSettings, Limits, ServedModel, build_api
from serve.host import ModelHost, encode_audio
from serve.local import LocalBackend
from tests.serve_helpers import make_random_adapter, reference_audio, wav_bytes_to_array

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = ServedModel(name="mg", family="musicgen-melody", base="tiny")
LIMITS = Limits(max_duration_s=2.0, max_prompt_chars=40, max_upload_bytes=64_000, max_melody_s=1.0, max_steps=50,
                max_pending=1, retry_after_s=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_api")
    reg = Registry(str(root / "registry"))
    dirs = [make_random_adapter("tiny", str(root / f"src{s}"), s) for s in (1, 2)]
    reg.publish(dirs[0], "alpha")
    reg.publish(dirs[1], "beta")
    host = ModelHost("musicgen-melody", "tiny", reg.url, torch_threads=1, lora_slots=2)
    return {"registry": reg, "dirs": dirs, "host": host}


def _app(world, **limits):
    settings = ApiSettings(models=[MODEL], registry_url=world["registry"].url, api_key=KEY,
                           limits=LIMITS.model_copy(update=limits))
    return build_api(LocalBackend({"mg": world["host"]}, max_adapters=1), settings)


@pytest.fixture
def client(world):
    with TestClient(_app(world)) as c:
        yield c


def _wav(seconds: float, sr: int = 16_000) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(seconds * sr)) / sr
    sf.write(buf, 0.3 * np.sin(2 * np.pi * 440 * t), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _gen(client, **body):
    return client.post("/v1/generate", json={"prompt": "calm piano", "duration_s": 0.3, "seed": 5, **body},
                       headers=AUTH)


def test_base_and_adapters_give_the_expected_audio(client, world):
    base = _gen(client)
    assert base.status_code == 200 and base.headers["content-type"] == "audio/wav"
    assert base.headers["x-musiclora-adapter"] == "none" and base.headers["x-musiclora-seed"] == "5"
    assert base.headers["x-musiclora-channels"] == "1" and sf.info(io.BytesIO(base.content)).channels == 1
    a, b = _gen(client, adapter="alpha"), _gen(client, adapter="beta@1")
    assert a.headers["x-musiclora-adapter"] == "alpha@1" and b.headers["x-musiclora-adapter"] == "beta@1"
    audio = {k: wav_bytes_to_array(r.content)[0] for k, r in (("base", base), ("a", a), ("b", b))}
    assert not np.array_equal(audio["a"], audio["b"]) and not np.array_equal(audio["a"], audio["base"])
    np.testing.assert_array_equal(audio["base"], reference_audio("tiny", None, "calm piano", 0.3, 5))
    np.testing.assert_array_equal(audio["a"], reference_audio("tiny", world["dirs"][0], "calm piano", 0.3, 5))
    # max_adapters=1: alpha was evicted for beta, comes back, and the base after it is still the base
    again = _gen(client, adapter="alpha")
    np.testing.assert_array_equal(wav_bytes_to_array(again.content)[0], audio["a"])
    np.testing.assert_array_equal(wav_bytes_to_array(_gen(client).content)[0], audio["base"])
    assert world["host"].attached() == ["alpha@1"]


def test_flac_and_multipart_melody(client):
    assert _gen(client, duration_s=1, guidance_scale=1).status_code == 200  # JSON integers are fine for floats
    r = _gen(client, format="flac", melody_b64=base64.b64encode(_wav(0.5)).decode())
    assert r.status_code == 200 and r.headers["content-type"] == "audio/flac" and r.headers["x-musiclora-melody"] == "yes"
    assert wav_bytes_to_array(r.content)[1] == 32_000
    r = client.post("/v1/generate", data={"prompt": "calm piano", "duration_s": "0.3", "steps": "", "adapter": "beta"},
                    files={"melody": ("m.wav", _wav(0.5), "audio/wav")}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.headers["x-musiclora-adapter"] == "beta@1" and r.headers["x-musiclora-duration-s"] == "0.3"


BAD = [
    # (name, request kwargs, status, words in the reason)
    ("malformed json", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ("json array", {"json": ["calm"]}, 422, "JSON object"),
    ("prompt not a string", {"json": {"prompt": 5}}, 422, "prompt"),
    ("seed as string", {"json": {"prompt": "x", "seed": "7"}}, 422, "seed"),
    ("duration as string", {"json": {"prompt": "x", "duration_s": "1"}}, 422, "duration_s"),
    ("unknown field", {"json": {"prompt": "x", "temperature": 2}}, 422, "temperature"),
    ("missing prompt", {"json": {"seed": 1}}, 422, "prompt"),
    ("unknown adapter", {"json": {"prompt": "x", "adapter": "nope"}}, 404, "no adapter named 'nope'"),
    ("unknown version", {"json": {"prompt": "x", "adapter": "alpha@9"}}, 404, "no version 9"),
    ("dotdot adapter", {"json": {"prompt": "x", "adapter": "../alpha"}}, 422, "not valid"),
    ("absolute adapter", {"json": {"prompt": "x", "adapter": "/etc/passwd"}}, 422, "not valid"),
    ("url adapter", {"json": {"prompt": "x", "adapter": "s3://bucket/registry/x"}}, 422, "not valid"),
    ("adapter not a string", {"json": {"prompt": "x", "adapter": ["alpha"]}}, 422, "adapter"),
    ("unknown model", {"json": {"prompt": "x", "model": "other"}}, 404, "unknown model"),
    ("duration too long", {"json": {"prompt": "x", "duration_s": 5}}, 422, "duration_s 5"),
    ("duration zero", {"json": {"prompt": "x", "duration_s": 0}}, 422, "duration_s"),
    ("steps zero", {"json": {"prompt": "x", "steps": 0}}, 422, "steps"),
    ("steps too many", {"json": {"prompt": "x", "steps": 51}}, 422, "steps 51"),
    ("negative seed", {"json": {"prompt": "x", "seed": -1}}, 422, "seed"),
    ("prompt too long", {"json": {"prompt": "x" * 41}}, 422, "41 characters"),
    ("guidance too large", {"json": {"prompt": "x", "guidance_scale": 1e9}}, 422, "guidance_scale"),
    ("guidance below 1", {"json": {"prompt": "x", "guidance_scale": 0.5}}, 422, "outside [1.0, 20.0]"),
    ("bad format", {"json": {"prompt": "x", "format": "mp3"}}, 422, "format"),
    ("bad base64", {"json": {"prompt": "x", "melody_b64": "!!!"}}, 422, "base64"),
    ("non-audio upload", {"json": {"prompt": "x", "melody_b64": base64.b64encode(b"GIF89a" * 50).decode()}}, 415,
     "not decodable audio"),
    ("empty upload", {"data": {"prompt": "x"}, "files": {"melody": ("m.wav", b"", "audio/wav")}}, 415, "melody"),
    ("oversize upload", {"data": {"prompt": "x"}, "files": {"melody": ("m.bin", b"\0" * 70_000, "audio/wav")}}, 413,
     "over the limit"),
    ("melody too long", {"data": {"prompt": "x"}, "files": {"melody": ("m.wav", _wav(1.5), "audio/wav")}}, 413,
     "1.5 s long"),
    ("oversize body", {"content": b"{" + b" " * 200_000 + b"}", "headers": {"content-type": "application/json"}}, 413,
     "over the limit"),
    ("text body", {"content": b"prompt=x", "headers": {"content-type": "text/plain"}}, 415, "text/plain"),
    ("two melodies", {"data": {"prompt": "x", "melody_b64": base64.b64encode(_wav(0.2)).decode()},
                      "files": {"melody": ("m.wav", _wav(0.2), "audio/wav")}}, 422, "melody once"),
    ("unexpected file", {"data": {"prompt": "x"}, "files": {"other": ("m.wav", _wav(0.2), "audio/wav")}}, 422,
     "'other'"),
    ("form duration not a number", {"data": {"prompt": "x", "duration_s": "long"}}, 422, "duration_s"),
]


@pytest.mark.parametrize("name, kwargs, status, words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_4xx_with_a_reason(client, name, kwargs, status, words):
    headers = {**AUTH, **kwargs.pop("headers", {})}
    r = client.post("/v1/generate", headers=headers, **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_service_keeps_serving_after_bad_input(client):
    for _, kwargs, _, _ in BAD[:6]:
        client.post("/v1/generate", headers=AUTH, **{k: v for k, v in kwargs.items() if k != "headers"})
    assert _gen(client).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}])
def test_api_key_required(client, headers):
    for r in (client.post("/v1/generate", json={"prompt": "x"}, headers=headers),
              client.get("/v1/adapters", headers=headers)):
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "API key" in r.json()["detail"]
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("audio_format", ["wav", "flac"])
def test_encode_audio_keeps_the_channels_and_the_client_decodes_them(audio_format):
    """What the host sends for mono [L] and stereo [2, L], and what `Clip.waveform` gives back."""
    t = np.arange(4410) / 44100
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 660 * t)]).astype(np.float32)
    for audio in (stereo, stereo[0]):
        data, media_type = encode_audio(audio, 44100, audio_format)
        assert media_type == f"audio/{audio_format}" and sf.info(io.BytesIO(data)).channels == audio.ndim
        back, rate = Clip(data, media_type, {}).waveform()
        assert rate == 44100 and back.shape == audio.shape
        np.testing.assert_allclose(back, audio, atol=1 / 32768)
    with pytest.raises(ValueError, match=r"looks like \[L, C\]"):
        encode_audio(stereo.T, 44100, audio_format)
    with pytest.raises(ValueError, match="not supported"):
        encode_audio(stereo, 44100, "mp3")


def test_adapters_and_openapi(client):
    listed = client.get("/v1/adapters", headers=AUTH).json()
    assert [(a["name"], a["versions"], a["models"]) for a in listed["adapters"]] == [("alpha", [1], ["mg"]),
                                                                                    ("beta", [1], ["mg"])]
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/generate"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert "adapter" in body["application/json"]["schema"]["properties"]
    assert "channels" in spec["paths"]["/v1/generate"]["post"]["responses"]["200"]["description"]


def test_bounded_queue_answers_429_with_retry_after(world):
    app = _app(world, max_pending=1)

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            body = {"prompt": "calm piano", "duration_s": 1.0}
            return await asyncio.gather(*[c.post("/v1/generate", json=body, headers=AUTH) for _ in range(4)])

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert sorted(set(codes)) == [200, 429], codes
    r429 = next(r for r in responses if r.status_code == 429)
    assert int(r429.headers["retry-after"]) >= 1 and "limit is 1" in json.loads(r429.content)["detail"]


def test_requests_for_different_adapters_run_as_one_batch_with_their_solo_audio(world):
    """Four concurrent requests (two adapters, the base, two seeds, two durations) share one batch
    (the batch fills at 4, so no timing is involved) and each gets the audio it gets alone."""
    settings = ApiSettings(models=[MODEL], registry_url=world["registry"].url, api_key=KEY,
                           limits=LIMITS.model_copy(update={"max_pending": 8}))
    app = build_api(LocalBackend({"mg": world["host"]}, max_adapters=2, max_batch_size=4, batch_wait_timeout_s=60),
                    settings)
    bodies = [{"adapter": "alpha", "seed": 5}, {"adapter": "beta", "seed": 5}, {"seed": 5}, {"adapter": "alpha", "seed": 7,
                                                                                          "duration_s": 0.2}]

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as c:
            return await asyncio.gather(*[c.post("/v1/generate", headers=AUTH, json={"prompt": "calm piano",
                                                                                     "duration_s": 0.3, **b})
                                          for b in bodies])

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 4
    assert [r.headers["x-musiclora-batch-size"] for r in responses] == ["4"] * 4
    dirs = {"alpha": world["dirs"][0], "beta": world["dirs"][1], None: None}
    for body, r in zip(bodies, responses):
        want = reference_audio("tiny", dirs[body.get("adapter")], "calm piano", body.get("duration_s", 0.3), body["seed"])
        np.testing.assert_allclose(wav_bytes_to_array(r.content)[0], want, atol=2 / 32768)


def _silent_flac(seconds: float, sr: int = 8000, claim_frames: int | None = None) -> bytes:
    """Silent FLAC: a few KiB for minutes of audio. `claim_frames` rewrites STREAMINFO's total
    samples (0 = unknown length, as a streamed file; small = a header that lies short)."""
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * sr), np.float32), sr, format="FLAC", subtype="PCM_16")
    data = bytearray(buf.getvalue())
    if claim_frames is not None:  # 'fLaC', block header (4 bytes), STREAMINFO: total samples = low 36 bits of 10..17
        field = int.from_bytes(data[18:26], "big")
        data[18:26] = ((field & ~((1 << 36) - 1)) | claim_frames).to_bytes(8, "big")
    return bytes(data)


def _post_melody(client, data: bytes):
    return client.post("/v1/generate", headers=AUTH, data={"prompt": "x", "duration_s": "0.2"},
                       files={"melody": ("m.flac", data, "audio/flac")})


def test_hostile_uploads_are_refused_from_the_header_or_at_the_decode_limit(client):
    long_low_bitrate = _silent_flac(600)  # 10 minutes in ~14 KB; the limit is 1 s
    assert len(long_low_bitrate) < LIMITS.max_upload_bytes
    r = _post_melody(client, long_low_bitrate)
    assert r.status_code == 413 and "600.0 s long (per its header)" in r.json()["detail"] and "1.0 s" in r.json()["detail"]
    r = _post_melody(client, _silent_flac(600, claim_frames=0))  # no length in the header: decode stops at 1 s
    assert r.status_code == 413 and "more than the limit of 1.0 s" in r.json()["detail"]
    r = _post_melody(client, _silent_flac(600, claim_frames=4000))  # lies short: only what it claims is read
    assert r.status_code == 200 and r.headers["x-musiclora-melody"] == "yes"
    for junk in (b"RIFF" + b"\xff" * 4000, b"fLaC" + bytes(range(256)) * 10, np.random.default_rng(0).bytes(5000)):
        r = _post_melody(client, junk)
        assert r.status_code == 415 and "not decodable audio" in r.json()["detail"]
    assert _gen(client).status_code == 200


def test_uploads_are_decoded_only_behind_the_in_flight_gate(world, monkeypatch):
    """With the one in-flight slot taken, an upload gets 429 without being decoded."""
    from serve import api

    decoded = []
    monkeypatch.setattr(api, "decode_upload", lambda data, limit: decoded.append(len(data)) or (np.zeros(800), 8000))
    release, started = asyncio.Event(), asyncio.Event()

    class Slow:
        async def generate(self, model, adapter, params):
            started.set()
            await release.wait()
            raise api.Overloaded(1)

    settings = ApiSettings(models=[MODEL], registry_url=world["registry"].url, api_key=KEY, limits=LIMITS)
    app = build_api(Slow(), settings)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            first = asyncio.create_task(c.post("/v1/generate", json={"prompt": "x"}, headers=AUTH))
            while not started.is_set():  # the first request holds the only slot
                await asyncio.sleep(0.01)
            second = await c.post("/v1/generate", headers=AUTH, data={"prompt": "x"},
                                  files={"melody": ("m.flac", _silent_flac(600), "audio/flac")})
            release.set()
            return await first, second

    first, second = asyncio.run(scenario())
    assert second.status_code == 429 and decoded == []
    assert first.status_code == 429  # Slow's own answer, after the upload was refused


def test_a_request_the_family_refuses_is_a_422_with_its_reason(world):
    """Stable Audio Open (text only, a 5.9 s window in the tiny preset) served next to MusicGen: a
    melody upload or a duration past the window is the family's ValueError, answered 422, not 500."""
    sao = ServedModel(name="sao", family="stable-audio-open", base="tiny")
    host = ModelHost("stable-audio-open", "tiny", world["registry"].url, torch_threads=1, lora_slots=0)
    settings = ApiSettings(models=[MODEL, sao], registry_url=world["registry"].url, api_key=KEY,
                           limits=LIMITS.model_copy(update={"max_duration_s": 10.0}))
    with TestClient(build_api(LocalBackend({"mg": world["host"], "sao": host}), settings)) as c:
        body = {"prompt": "calm", "model": "sao", "duration_s": 0.3, "steps": 2}
        melody = {"melody_b64": base64.b64encode(_wav(0.5)).decode()}
        for extra, words in (({"duration_s": 8.0}, "DiT window"), (melody, "text only")):
            r = c.post("/v1/generate", json={**body, **extra}, headers=AUTH)
            assert r.status_code == 422 and words in r.json()["detail"] and "'sao'" in r.json()["detail"], r.text
        ok = c.post("/v1/generate", json=body, headers=AUTH)
        assert ok.status_code == 200 and ok.headers["x-musiclora-sample-rate"] == "44100"
        assert ok.headers["x-musiclora-family"] == "stable-audio-open" and ok.headers["x-musiclora-steps"] == "2"
        # the family's stereo reaches the client: a 2-channel WAV, said in the headers
        clip = Clip(ok.content, ok.headers["content-type"], {})
        audio, rate = clip.waveform()
        assert ok.headers["x-musiclora-channels"] == "2" and sf.info(io.BytesIO(ok.content)).channels == 2
        assert rate == 44100 and audio.shape == (2, round(0.3 * 44100)) and np.abs(audio[0] - audio[1]).max() > 1e-3
        assert ok.headers["x-musiclora-audio-duration-s"] == "0.300"
