"""Drive headless Chromium over the DevTools protocol (no Playwright): open a page, run JS, type, screenshot."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Self

from websockets.sync.client import connect


def chromium_binary() -> str | None:
    """The Chromium executable (Debian's `chromium`), or None when not installed."""
    return next((b for b in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if b), None)


class Browser:
    """One headless Chromium on 127.0.0.1 with one page; use as a context manager."""

    def __init__(self, width: int = 1200, height: int = 1100, timeout_s: float = 60):
        binary = chromium_binary()
        if binary is None:
            raise RuntimeError("chromium is not installed (apt-get install chromium)")
        self._profile = tempfile.mkdtemp(prefix="musiclora-chromium-")
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={self._profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        port = self._devtools_port(timeout_s)
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.loads(r.read()) if t["type"] == "page")
        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(connect(page["webSocketDebuggerUrl"], max_size=64 * 2**20,
                                                    open_timeout=timeout_s))
        self._id = 0
        self.call("Page.enable")
        self.call("Runtime.enable")

    def _devtools_port(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if m:
                return int(m.group(1))
            if not line and self.proc.poll() is not None:
                break
        self.close()
        raise RuntimeError("chromium did not open its DevTools port")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result (events in between are skipped)."""
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=120))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str) -> Any:
        """Evaluate JS in the page (promises awaited) and return its value."""
        out = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in out:
            raise RuntimeError(f"JS failed: {out['exceptionDetails']}")
        return out["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 60, interval_s: float = 0.5) -> Any:
        """Poll a JS expression until it is truthy; returns its value.

        Raises:
            TimeoutError: still falsy after `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(interval_s)
        raise TimeoutError(f"page never satisfied {expression!r} within {timeout_s} s")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def click(self, selector: str) -> None:
        """Click the centre of the first element matching a CSS `selector` with the mouse."""
        self.click_element(f"document.querySelector({json.dumps(selector)})", selector)

    def click_element(self, element_js: str, what: str = "element") -> None:
        """Click the centre of the element a JS expression gives, with the mouse, as a user would.

        Raises:
            LookupError: the expression gives no element.
        """
        # instant scroll, then measure until the element stops moving (a smooth scroll or a growing
        # text box would move it under the mouse)
        measure = (f"(async () => {{const e = {element_js}; if (!e) return null; "
                   "e.scrollIntoView({block: 'center', behavior: 'instant'}); "
                   "await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r))); "
                   "const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]})()")
        rect, previous = self.js(measure), None
        for _ in range(20):
            if rect is None or rect == previous:
                break
            time.sleep(0.1)
            previous, rect = rect, self.js(measure)
        if rect is None:
            raise LookupError(f"no {what} on the page")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=rect[0], y=rect[1], button="left", clickCount=1)

    def type_text(self, text: str) -> None:
        """Type into the focused element as a user would (insertText)."""
        self.call("Input.insertText", text=text)

    def press(self, key: str, code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code)

    def screenshot(self, path: str | Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        try:
            if getattr(self, "_stack", None) is not None:
                self._stack.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
