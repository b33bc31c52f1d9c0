"""The HTTP API (FastAPI): request schema, limits, API key, adapter validation, errors.

`build_api(backend, settings)` returns the FastAPI app that the Ray Serve ingress wraps
(`serve/app.py`) and that the tests run in-process. Everything a client can get wrong is
answered here with a 4xx and a reason before any model is touched:

| what | status |
|---|---|
| body is not JSON / not an object, broken multipart | 400 |
| missing or wrong `Authorization: Bearer <key>` (when a key is configured) | 401 |
| unknown adapter, unknown model, adapter whose base no deployment serves | 404 |
| body or melody upload too large, melody too long | 413 |
| content type other than JSON / multipart / urlencoded form, melody that is not decodable audio | 415 |
| wrong types, unknown fields, bad adapter reference (`../`, `/`, URLs ...), out-of-range values | 422 |
| a request the model's family refuses (`ValueError`: a melody to a text-only family, a duration past its window) | 422 |
| too many requests in flight (bounded queue) | 429 + Retry-After |

A melody upload is read only behind the in-flight gate (`max_pending`): its duration comes from
its header first and decoding stops at `max_melody_s` (serve/uploads.py), so a small compressed
file cannot expand into gigabytes and a burst of uploads cannot decode past the gate.

An adapter is checked against the registry here, before routing: an unknown id inside Serve's
multiplexed loader would surface as a 500.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import math
import time
from typing import Any, Literal, Protocol

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from starlette.datastructures import UploadFile

from musiclora.adapter_registry import (
    AdapterNotFoundError,
    AdapterVersion,
    InvalidReferenceError,
    Registry,
    parse_ref,
)
from serve.host import AdapterLoadError, GenParams, GenResult
from serve.uploads import UploadError, decode_upload

log = logging.getLogger("musiclora.serve")

FORM_FIELDS = ("prompt", "adapter", "model", "duration_s", "guidance_scale", "seed", "steps", "format",
               "melody_b64")


class Overloaded(Exception):
    """The backend's queue is full; retry after `retry_after_s` seconds."""

    def __init__(self, retry_after_s: float | None = None):
        super().__init__(f"overloaded; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Limits(BaseModel):
    """What one request may ask for, and how much the service queues.

    Attributes:
        max_duration_s: longest clip in seconds.
        max_prompt_chars: longest prompt.
        max_upload_bytes: largest melody/reference upload (decoded bytes).
        max_melody_s: longest melody/reference audio in seconds.
        max_steps: most diffusion steps.
        min_guidance_scale: smallest guidance scale (below 1 MusicGen's classifier-free guidance fails in
            transformers, so the default keeps requests to 1 and up).
        max_guidance_scale: largest guidance scale.
        max_pending: generate requests in flight per ingress replica before 429.
        request_timeout_s: a generation that takes longer answers 504.
        retry_after_s: Retry-After on 429 before any latency has been measured.
    """

    model_config = ConfigDict(extra="forbid")

    max_duration_s: float = Field(30.0, gt=0)
    max_prompt_chars: int = Field(500, gt=0)
    max_upload_bytes: int = Field(10 * 2**20, gt=0)
    max_melody_s: float = Field(60.0, gt=0)
    max_steps: int = Field(200, gt=0)
    min_guidance_scale: float = Field(1.0, ge=0)
    max_guidance_scale: float = Field(20.0, ge=0)
    max_pending: int = Field(32, gt=0)
    request_timeout_s: float = Field(300.0, gt=0)
    retry_after_s: float = Field(2.0, gt=0)

    @property
    def max_body_bytes(self) -> int:
        """Largest request body: a base64 upload (4/3 of the bytes) plus 64 KiB for the other fields."""
        return self.max_upload_bytes * 4 // 3 + 4 + 64 * 1024


class ServedModel(BaseModel):
    """A base model the service runs (one Serve deployment each).

    Attributes:
        name: the model's name in the API (`model` field) and in its deployment's name.
        family: model family name.
        base: base model id / folder / `tiny`.
        base_aliases: other `base_model` values of adapter cards this deployment accepts
            (`*`: any adapter of the family).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    family: str
    base: str
    base_aliases: list[str] = []

    def accepts(self, adapter: AdapterVersion) -> bool:
        """Whether an adapter (by its card's family and base_model) runs on this model."""
        if adapter.family != self.family:
            return False
        card_base = str(adapter.card.get("base_model") or "").rstrip("/")
        return "*" in self.base_aliases or card_base in {self.base.rstrip("/"), *self.base_aliases}


class ApiSettings(BaseModel):
    """Everything `build_api` needs besides the backend.

    Attributes:
        models: the served base models; the first is the default for requests without adapter.
        registry_url: adapter registry root (None: `default_registry_url()`).
        limits: see `Limits`.
        api_key: bearer key required on /v1/* when set.
        registry_cache_s: seconds a resolved `name` (latest) or a miss is cached.
    """

    model_config = ConfigDict(extra="forbid")

    models: list[ServedModel] = Field(min_length=1)
    registry_url: str | None = None
    limits: Limits = Limits()
    api_key: SecretStr | None = None
    registry_cache_s: float = Field(5.0, ge=0)


class GenerateRequest(BaseModel):
    """POST /v1/generate body (JSON, or the same fields as multipart form fields).

    `melody_b64` is base64 audio (WAV, FLAC, OGG, MP3); in a multipart form the file field
    `melody` does the same. It is MusicGen-Melody's melody and AudioLDM's reference audio.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="text prompt")
    adapter: str | None = Field(None, description="registry adapter `name[@version]`; none for the base model")
    model: str | None = Field(None, description="served base model (default: the adapter's, else the first)")
    duration_s: float = Field(2.0, gt=0, description="seconds of audio")
    guidance_scale: float = Field(3.0, ge=0)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    steps: int | None = Field(None, ge=1, description="diffusion steps (families without steps ignore it)")
    format: Literal["wav", "flac"] = Field("wav", description="16-bit PCM container; the clip has the model "
                                                               "family's channels (mono, or stereo for Stable Audio "
                                                               "Open)")
    melody_b64: str | None = Field(None, description="base64 melody / reference audio")


class Backend(Protocol):
    """Where generation happens: Ray Serve handles in production, a `ModelHost` in process for tests."""

    async def generate(self, model: str, adapter: AdapterVersion | None, params: GenParams) -> GenResult:
        """Generate one clip. Raises Overloaded, AdapterNotFoundError, AdapterLoadError, TimeoutError."""


class AdapterResolver:
    """Registry look-ups for the ingress, off the event loop, with a small cache.

    `name@N` is immutable once complete, so it is cached for good; `name` (latest) and misses
    are cached for `ttl_s`, so a promote is seen within that time.
    """

    def __init__(self, registry: Registry, ttl_s: float):
        self.registry, self.ttl_s = registry, ttl_s
        self._cache: dict[str, tuple[float, AdapterVersion | Exception]] = {}

    async def resolve(self, ref: str) -> AdapterVersion:
        parsed = parse_ref(ref)  # syntax first: nothing unsafe reaches storage
        key = str(parsed)
        hit = self._cache.get(key)
        if hit and (parsed.version is not None and not isinstance(hit[1], Exception)
                    or time.monotonic() - hit[0] < self.ttl_s):
            value = hit[1]
        else:
            try:
                value = await asyncio.to_thread(self.registry.resolve, parsed)
            except AdapterNotFoundError as exc:
                value = exc
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = (time.monotonic(), value)
        if isinstance(value, Exception):
            raise value
        return value

    async def list(self) -> list[dict[str, Any]]:
        hit = self._cache.get("\0list")
        if hit and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]  # type: ignore[return-value]
        value = await asyncio.to_thread(self.registry.list)
        self._cache["\0list"] = (time.monotonic(), value)  # type: ignore[assignment]
        return value


def _fail(status: int, reason: str, headers: dict[str, str] | None = None) -> HTTPException:
    return HTTPException(status_code=status, detail=reason, headers=headers)


def _openapi_body() -> dict[str, Any]:
    schema = GenerateRequest.model_json_schema()
    form = json.loads(json.dumps(schema))
    form["properties"]["melody"] = {"type": "string", "format": "binary", "description": "melody / reference audio file"}
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema},
                                                      "multipart/form-data": {"schema": form}}},
        "responses": {"200": {"description": "the generated clip, 16-bit PCM WAV or FLAC with the model family's "
                                             "channels (1: mono; 2: stereo, Stable Audio Open); generation parameters "
                                             "in X-Musiclora-* headers (X-Musiclora-Channels, X-Musiclora-Sample-Rate, "
                                             "X-Musiclora-Audio-Duration-S ...)",
                              "content": {"audio/wav": {}, "audio/flac": {}}}},
    }


class _Api:
    """Request handling for `build_api` (state: settings, backend, resolver, pending count, latency)."""

    def __init__(self, backend: Backend, settings: ApiSettings):
        self.backend, self.settings, self.limits = backend, settings, settings.limits
        self.resolver = AdapterResolver(Registry(settings.registry_url), settings.registry_cache_s)
        self.models = {m.name: m for m in settings.models}
        self.pending = 0
        self.latency_s: float | None = None  # moving average, for Retry-After

    def check_key(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.get_secret_value().encode()):
            raise _fail(401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                        {"WWW-Authenticate": "Bearer"})

    async def read_body(self, request: Request) -> bytes:
        cap = self.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cap):
            raise _fail(413, f"request body of {length} bytes is over the limit of {cap} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > cap:
                raise _fail(413, f"request body is over the limit of {cap} bytes")
        return bytes(body)

    async def parse(self, request: Request) -> tuple[GenerateRequest, bytes | None]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in ("application/json", "multipart/form-data", "application/x-www-form-urlencoded"):
            raise _fail(415, f"content type {ctype or 'none'!r} is not supported; expected application/json, "
                             "multipart/form-data or application/x-www-form-urlencoded")
        body = await self.read_body(request)
        upload: bytes | None = None
        if ctype == "application/json":
            try:
                data = json.loads(body)
            except (ValueError, UnicodeDecodeError) as exc:
                raise _fail(400, f"body is not valid JSON: {exc}") from exc
            if not isinstance(data, dict):
                raise _fail(422, f"body must be a JSON object, not {type(data).__name__}")
            strict = True
        else:
            data, upload = await self._parse_form(request, body)
            strict = False
        try:
            req = GenerateRequest.model_validate(data, strict=strict)
        except ValidationError as exc:
            raise _fail(422, _validation_reason(exc)) from exc
        if req.melody_b64 is not None:
            if upload is not None:
                raise _fail(422, "give the melody once: either the 'melody' file or 'melody_b64'")
            try:
                upload = base64.b64decode(req.melody_b64, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise _fail(422, f"melody_b64 is not valid base64: {exc}") from exc
        return req, upload

    async def _parse_form(self, request: Request, body: bytes) -> tuple[dict[str, Any], bytes | None]:
        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=len(FORM_FIELDS) + 1)
        except Exception as exc:
            raise _fail(400, f"malformed multipart body: {exc}") from exc
        data: dict[str, Any] = {}
        upload = None
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "melody":
                    raise _fail(422, f"unexpected file field {key!r}; the only file field is 'melody'")
                upload = await value.read()
            elif key in data:
                raise _fail(422, f"form field {key!r} given twice")
            else:
                data[key] = value
        # an empty optional field from an HTML form means "not given"
        data = {k: v for k, v in data.items() if not (v == "" and k in ("adapter", "model", "steps", "melody_b64"))}
        return data, upload

    def check_limits(self, req: GenerateRequest) -> None:
        lim = self.limits
        checks = [
            (req.duration_s <= lim.max_duration_s, f"duration_s {req.duration_s} is over the limit of {lim.max_duration_s}"),
            (len(req.prompt) <= lim.max_prompt_chars,
             f"prompt has {len(req.prompt)} characters; the limit is {lim.max_prompt_chars}"),
            (req.steps is None or req.steps <= lim.max_steps, f"steps {req.steps} is over the limit of {lim.max_steps}"),
            (lim.min_guidance_scale <= req.guidance_scale <= lim.max_guidance_scale,
             f"guidance_scale {req.guidance_scale} is outside [{lim.min_guidance_scale}, {lim.max_guidance_scale}]"),
            (math.isfinite(req.duration_s) and math.isfinite(req.guidance_scale), "numbers must be finite"),
        ]
        for ok, reason in checks:
            if not ok:
                raise _fail(422, reason)

    def decode_melody(self, data: bytes) -> tuple[Any, int]:
        """Bounded decode of a melody upload (serve/uploads.py); call behind the in-flight gate."""
        if len(data) > self.limits.max_upload_bytes:
            raise _fail(413, f"melody upload of {len(data)} bytes is over the limit of {self.limits.max_upload_bytes}")
        try:
            return decode_upload(data, self.limits.max_melody_s)
        except UploadError as exc:
            raise _fail(exc.status, str(exc)) from exc

    async def route(self, req: GenerateRequest) -> tuple[ServedModel, AdapterVersion | None]:
        adapter = None
        if req.adapter is not None:
            try:
                adapter = await self.resolver.resolve(req.adapter)
            except InvalidReferenceError as exc:
                raise _fail(422, str(exc)) from exc
            except AdapterNotFoundError as exc:
                raise _fail(404, str(exc)) from exc
        if req.model is not None:
            model = self.models.get(req.model)
            if model is None:
                raise _fail(404, f"unknown model {req.model!r}; served models: {sorted(self.models)}")
            if adapter is not None and not model.accepts(adapter):
                raise _fail(422, f"adapter {adapter.ref} ({adapter.family}, base {adapter.card.get('base_model')!r}) "
                                 f"does not run on model {model.name!r} ({model.family}, base {model.base!r})")
            return model, adapter
        if adapter is None:
            return self.settings.models[0], None
        for model in self.settings.models:
            if model.accepts(adapter):
                return model, adapter
        raise _fail(404, f"no served model runs adapter {adapter.ref} ({adapter.family}, base "
                         f"{adapter.card.get('base_model')!r}); served: "
                         f"{[(m.name, m.family, m.base) for m in self.settings.models]}")

    def retry_after(self) -> str:
        guess = self.latency_s or self.limits.retry_after_s
        return str(max(1, math.ceil(guess)))

    async def generate(self, request: Request) -> Response:
        self.check_key(request)
        req, upload = await self.parse(request)
        self.check_limits(req)
        model, adapter = await self.route(req)
        if self.pending >= self.limits.max_pending:
            raise _fail(429, f"{self.pending} requests in flight, the limit is {self.limits.max_pending}; retry later",
                        {"Retry-After": self.retry_after()})
        self.pending += 1  # the gate: uploads are read and decoded only behind it
        start = time.perf_counter()
        try:
            melody, melody_sr = await asyncio.to_thread(self.decode_melody, upload) if upload is not None else (None, None)
            try:
                params = GenParams(req.prompt, req.duration_s, req.guidance_scale, req.seed, req.steps, melody,
                                   melody_sr, req.format)
            except ValueError as exc:
                raise _fail(422, str(exc)) from exc
            result = await asyncio.wait_for(self.backend.generate(model.name, adapter, params),
                                            self.limits.request_timeout_s)
        except Overloaded as exc:
            after = str(max(1, math.ceil(exc.retry_after_s))) if exc.retry_after_s else self.retry_after()
            raise _fail(429, "the model's queue is full; retry later", {"Retry-After": after}) from exc
        except AdapterNotFoundError as exc:
            raise _fail(404, str(exc)) from exc
        except AdapterLoadError as exc:
            raise _fail(422, str(exc)) from exc
        except ValueError as exc:  # the family refuses the request (e.g. a melody to a text-only model)
            raise _fail(422, f"model {model.name!r} ({model.family}) cannot run this request: {exc}") from exc
        except TimeoutError as exc:
            raise _fail(504, f"generation took longer than {self.limits.request_timeout_s} s") from exc
        finally:
            self.pending -= 1
        took = time.perf_counter() - start
        self.latency_s = took if self.latency_s is None else 0.8 * self.latency_s + 0.2 * took
        headers = self.headers(req, model, adapter, result, took, melody is not None)
        return Response(result.audio, media_type=result.media_type, headers=headers)

    def headers(self, req: GenerateRequest, model: ServedModel, adapter: AdapterVersion | None, result: GenResult,
                took: float, has_melody: bool) -> dict[str, str]:
        return {
            "X-Musiclora-Model": model.name, "X-Musiclora-Family": model.family, "X-Musiclora-Base": model.base,
            "X-Musiclora-Adapter": adapter.ref if adapter else "none",
            "X-Musiclora-Seed": str(req.seed), "X-Musiclora-Duration-S": repr(req.duration_s),
            "X-Musiclora-Guidance-Scale": repr(req.guidance_scale),
            "X-Musiclora-Steps": "none" if result.steps is None else str(result.steps),
            "X-Musiclora-Melody": "yes" if has_melody else "no",
            "X-Musiclora-Sample-Rate": str(result.sample_rate),
            "X-Musiclora-Channels": str(result.channels),
            "X-Musiclora-Audio-Duration-S": f"{result.num_samples / result.sample_rate:.3f}",
            "X-Musiclora-Batch-Size": str(result.batch_size),
            "X-Musiclora-Latency-S": f"{took:.3f}",
        }

    async def adapters(self, request: Request) -> dict[str, Any]:
        self.check_key(request)
        out = []
        for entry in await self.resolver.list():
            fake = AdapterVersion(entry["family"], entry["name"], entry["resolves_to"], "",
                                  {"base_model": entry["base_model"]})
            served = [m.name for m in self.settings.models if m.accepts(fake)]
            out.append({**entry, "models": served})
        return {"adapters": out, "models": [m.model_dump() for m in self.settings.models]}


def _validation_reason(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def build_api(backend: Backend, settings: ApiSettings) -> FastAPI:
    """The FastAPI app: POST /v1/generate, GET /v1/adapters, GET /healthz (OpenAPI at /docs).

    Args:
        backend: where generation runs.
        settings: served models, registry, limits and API key.
    """
    api = _Api(backend, settings)
    app = FastAPI(title="musiclora", version="1",
                  description="Text-to-music generation with LoRA adapters from the musiclora registry.")

    @app.post("/v1/generate", openapi_extra=_openapi_body(), response_class=Response,
              summary="Generate a clip with a base model and an optional adapter")
    async def generate(request: Request) -> Response:
        return await api.generate(request)

    @app.get("/v1/adapters", summary="Adapters in the registry and the models that run them")
    async def adapters(request: Request) -> dict[str, Any]:
        return await api.adapters(request)

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "models": [m.name for m in settings.models], "pending": api.pending}

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    app.state.api = api
    return app
