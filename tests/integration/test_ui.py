"""The web page (serve/ui.py) in headless Chromium against a running API: pick an adapter, generate, get audio.

The API runs in process (serve/local.py: the same FastAPI app and ModelHost as the Ray Serve
deployment) on 127.0.0.1 with an API key, the page on another port; Chromium is driven over the
DevTools protocol as a person would use the page.
"""

from __future__ import annotations

import io
import os
import socket
import threading
import time

import httpx
import pytest
import soundfile as sf

from musiclora.adapter_registry import Registry
from tests.cdp import Browser, chromium_binary
from tests.serve_helpers import make_random_adapter

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(chromium_binary() is None, reason="chromium not installed (scripts/setup.sh installs it)"),
]
KEY = "ui-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    import uvicorn

    from serve.api import ServedModel
    from serve.local import build_local_api
    from serve.ui import build_ui

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    tmp = tmp_path_factory.mktemp("ui")
    registry = Registry(str(tmp / "registry"))
    registry.publish(make_random_adapter("tiny", str(tmp / "alpha"), 1), "alpha")
    api = build_local_api([ServedModel(name="mg", family="musicgen-melody", base="tiny")], registry.url,
                          api_key=KEY, torch_threads=1)
    api_port, ui_port = _free_port(), _free_port()
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=api_port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.2)
    page = build_ui(f"http://127.0.0.1:{api_port}", api_key=KEY, out_dir=str(tmp / "clips"))
    page.launch(server_name="127.0.0.1", server_port=ui_port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{ui_port}/"
    finally:
        page.close()
        server.should_exit = True
        thread.join(30)


def test_page_generates_with_an_adapter_and_shows_errors(page_url, tmp_path):
    with Browser() as b:
        b.goto(page_url)
        b.wait_for("document.querySelector('#generate') !== null")
        b.click("#adapter input")
        options = b.wait_for("(() => {const i = document.querySelector('#adapter input'); "
                             "const list = document.getElementById(i.getAttribute('aria-controls')); "
                             "const o = list ? Array.from(list.querySelectorAll('li')) : []; "
                             "return o.length && o.map(e => e.textContent)})()", timeout_s=30)
        assert any("alpha@1" in o for o in options), options
        b.click_element("Array.from(document.getElementById(document.querySelector('#adapter input')"
                        ".getAttribute('aria-controls')).querySelectorAll('li'))"
                        ".find(e => e.textContent.trim().endsWith('alpha@1'))", "alpha@1 option")
        b.wait_for("document.querySelector('#adapter input').value === 'alpha@1'", timeout_s=10)
        b.click("#prompt textarea")
        b.js("document.querySelector('#prompt textarea').select()")
        b.type_text("lofi beat with vinyl crackle")
        b.click("#generate")
        href = b.wait_for("(() => {const p = document.querySelector('#params'); "
                          "return p && p.innerText.includes('alpha@1') && "
                          "document.querySelector('#result a[download]')?.href})()", timeout_s=180)
        b.screenshot(tmp_path / "page.png")
        clip = httpx.get(href, timeout=30, trust_env=False)
        assert clip.status_code == 200
        audio, sr = sf.read(io.BytesIO(clip.content))
        assert sr == 32_000 and len(audio) == 2 * sr
        # an error from the API shows as a message on the page, with its status and reason
        b.click("#prompt textarea")
        b.js("document.querySelector('#prompt textarea').select()")
        b.type_text("x" * 600)
        b.click("#generate")
        try:
            b.wait_for("document.body.innerText.includes('422') && document.body.innerText.includes('characters')",
                       timeout_s=60)
        except TimeoutError:
            b.screenshot(tmp_path / "error.png")
            raise
