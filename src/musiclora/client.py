"""HTTP client of the musiclora service (serve/): generate a clip, list adapters, check health.

What `musiclora generate --endpoint URL` and the web page use. The API key comes from the
argument or `$MUSICLORA_API_KEY`; errors carry the server's status and reason.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from musiclora.audio import load_clip

API_KEY_ENV = "MUSICLORA_API_KEY"
HEADER_PREFIX = "x-musiclora-"


class ServiceError(RuntimeError):
    """The service answered with an error, or could not be reached.

    Attributes:
        status: HTTP status (0 when the endpoint did not answer).
        reason: the server's `detail`, or the connection error.
        retry_after_s: the Retry-After of a 429/503, else None.
    """

    def __init__(self, status: int, reason: str, endpoint: str, retry_after_s: float | None = None):
        self.status, self.reason, self.retry_after_s = status, reason, retry_after_s
        where = f"{endpoint} answered {status}" if status else f"cannot reach {endpoint}"
        super().__init__(f"{where}: {reason}")


@dataclass
class Clip:
    """A generated clip.

    Attributes:
        audio: the file's bytes (WAV or FLAC, 16-bit PCM) with the model family's channels.
        media_type: `audio/wav` or `audio/flac`.
        params: generation parameters from the `X-Musiclora-*` headers (`adapter`, `seed`, `model`,
            `duration-s`, `guidance-scale`, `steps`, `sample-rate`, `channels`, `latency-s` ...), as strings.
    """

    audio: bytes
    media_type: str
    params: dict[str, str]

    def waveform(self) -> tuple[np.ndarray, int]:
        """Decode the clip into the layout the model family generated.

        Returns:
            (float32 waveform, sample rate in Hz): mono [L], or channels-first [C, L] for a stereo
            family (Stable Audio Open: [2, L]).

        Raises:
            AudioDecodeError: the bytes are not audio.
        """
        return load_clip(io.BytesIO(self.audio), name=f"clip ({self.media_type or 'no content type'})")


class ServiceClient:
    """Client of one endpoint (`http://host:port`).

    Args:
        endpoint: base URL of the service.
        api_key: bearer key; default `$MUSICLORA_API_KEY` (none when unset).
        timeout_s: seconds to wait for one response.
    """

    def __init__(self, endpoint: str, api_key: str | None = None, timeout_s: float = 600.0):
        if not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"endpoint {endpoint!r} must be an http:// or https:// URL")
        self.endpoint = endpoint.rstrip("/")
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.timeout_s = timeout_s

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            with httpx.Client(timeout=self.timeout_s, trust_env=False) as c:
                r = c.request(method, self.endpoint + path, headers=self._headers, **kwargs)
        except httpx.HTTPError as exc:
            raise ServiceError(0, str(exc), self.endpoint) from exc
        if r.status_code >= 400:
            try:
                reason = r.json().get("detail", r.text)
            except ValueError:
                reason = r.text
            after = r.headers.get("retry-after")
            raise ServiceError(r.status_code, str(reason), self.endpoint, float(after) if after else None)
        return r

    def health(self) -> dict[str, Any]:
        """GET /healthz."""
        return self._request("GET", "/healthz").json()

    def adapters(self) -> dict[str, Any]:
        """GET /v1/adapters: {"adapters": [...], "models": [...]}."""
        return self._request("GET", "/v1/adapters").json()

    def generate(
        self,
        prompt: str,
        adapter: str | None = None,
        duration_s: float = 2.0,
        guidance_scale: float = 3.0,
        seed: int = 0,
        steps: int | None = None,
        melody: str | Path | None = None,
        model: str | None = None,
        audio_format: str = "wav",
    ) -> Clip:
        """POST /v1/generate; the melody / reference audio file, when given, goes as a multipart upload.

        Raises:
            ServiceError: any 4xx/5xx (status and reason), or no answer.
            FileNotFoundError: `melody` does not exist.
        """
        fields: dict[str, Any] = {"prompt": prompt, "adapter": adapter, "model": model, "duration_s": duration_s,
                                  "guidance_scale": guidance_scale, "seed": seed, "steps": steps,
                                  "format": audio_format}
        fields = {k: v for k, v in fields.items() if v is not None}
        if melody is None:
            r = self._request("POST", "/v1/generate", json=fields)
        else:
            data = Path(melody).read_bytes()
            r = self._request("POST", "/v1/generate", data={k: str(v) for k, v in fields.items()},
                              files={"melody": (Path(melody).name, data, "application/octet-stream")})
        params = {k[len(HEADER_PREFIX):]: v for k, v in r.headers.items() if k.lower().startswith(HEADER_PREFIX)}
        return Clip(r.content, r.headers.get("content-type", ""), params)


def generate_to_file(endpoint: str, prompt: str, out: str | Path, api_key: str | None = None,
                     **kwargs: Any) -> dict[str, Any]:
    """Generate through the service and write the clip to `out` (WAV or FLAC by `audio_format`).

    The file is written as the service sent it: the model family's channels (a stereo family gives a
    2-channel file; `channels` says how many).

    Returns:
        {"wav": path, "endpoint", "bytes", **generation parameters from the headers (`sample-rate`,
        `channels`, `audio-duration-s`, ...)}.

    Raises:
        ServiceError: as `ServiceClient.generate`.
    """
    clip = ServiceClient(endpoint, api_key).generate(prompt, **kwargs)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_bytes(clip.audio)
    return {"wav": str(out), "endpoint": endpoint, "bytes": len(clip.audio), **clip.params}

