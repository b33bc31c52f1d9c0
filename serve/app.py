"""The Ray Serve application: a FastAPI ingress and one model deployment per base model.

`serve run serve/config.yaml` (or `serve deploy`) calls `build_app(args)` with the config's `args`.

```
HTTP ─▶ Ingress (FastAPI, serve/api.py): key, limits, body, adapter checked against the registry
          │  handle.options(multiplexed_model_id="name@version").generate.remote(params)
          ▼
        Model-<name> × N replicas (autoscaling): base model once (serve/host.py ModelHost),
          adapters via @serve.multiplexed (LRU, max_adapters per replica), routed by adapter id,
          requests for any adapters batched together (serve/batcher.py) into one generation
```

Batching and multiplexing: `@serve.batch` splits each batch by multiplexed model id, so requests
for different adapters would never share a batch. So `generate` reads the adapter id and loads the
adapter in the request's own context, pins it (`ModelHost.hold`, so the LRU cannot detach it while
queued), and hands `(adapter_id, params)` to the replica's `MixedBatcher`, whose batches run as one
batched generation (`ModelHost.run` -> `family.generate_batch`): every row with its own adapter
(peft's mixed adapter batches), seed and guidance, so a request gives the same audio alone and
inside any batch.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from musiclora.adapter_registry import AdapterVersion
from serve.api import ApiSettings, Limits, Overloaded, ServedModel, build_api
from serve.batcher import MixedBatcher
from serve.host import GenParams, GenResult, ModelHost

INGRESS = "Ingress"
MODEL_PREFIX = "Model-"


class ModelArgs(ServedModel):
    """One served base model and its replica settings.

    Attributes:
        revision: hub revision of the base.
        max_adapters: adapters kept per replica (Serve's multiplex LRU).
        max_batch_size: most requests one batch takes.
        batch_wait_timeout_s: how long a batch waits to fill.
        torch_threads: torch intra-op threads per replica.
        device: where each replica runs the model: cpu, cuda or cuda:N (None: cuda if the replica
            sees a GPU, else cpu; a GPU needs `ray_actor_options.num_gpus` on the deployment).
        dtype: parameter dtype of the model.
        lora_slots: LoRA slots per replica, created at start-up (serve/host.py `ModelHost`): an
            adapter that fits is copied into one, so loads stay flat as adapters come and go
            (None: max_adapters + max_batch_size, room for evicted adapters still queued; 0: off).
        slot_rank: rank of the slots (adapters of rank <= slot_rank fit).
        slot_targets: the slots' target modules: a family preset name or a module list.
    """

    revision: str | None = None
    max_adapters: int = Field(4, ge=1)
    max_batch_size: int = Field(4, ge=1)
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    torch_threads: int | None = Field(1, ge=1)
    device: str | None = Field(None, pattern=r"^(cpu|cuda(:[0-9]+)?)$")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    lora_slots: int | None = Field(None, ge=0)
    slot_rank: int = Field(8, ge=1)
    slot_targets: str | list[str] = "attn"


class AppArgs(BaseModel):
    """The `args` of serve/config.yaml.

    Attributes:
        models: served base models; deployment `Model-<name>` each. The first serves requests
            without adapter or model.
        registry_url: adapter registry root (None: `$MUSICLORA_REGISTRY_URL` or s3://musiclora/registry).
        api_key_env: environment variable holding the bearer key, read on the ingress; when it is unset
            or empty there the app refuses to start (fails closed). None (`api_key_env: null`) asks
            for an open endpoint explicitly.
        limits: request limits and the bounded queue (serve/api.py `Limits`).
        registry_cache_s: seconds the ingress caches `latest` look-ups and misses.
    """

    model_config = ConfigDict(extra="forbid")

    models: list[ModelArgs] = Field(min_length=1)
    registry_url: str | None = None
    api_key_env: str | None = Field("MUSICLORA_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    limits: Limits = Limits()
    registry_cache_s: float = Field(5.0, ge=0)


class MissingApiKeyError(RuntimeError):
    """`api_key_env` names a variable that is unset or empty where the ingress runs."""


def read_api_key(api_key_env: str | None) -> str | None:
    """The bearer key from `$api_key_env`, failing closed.

    Returns:
        the key, or None when `api_key_env` is None (an open endpoint, asked for explicitly).

    Raises:
        MissingApiKeyError: the variable is unset or blank (the message says how to fix it).
    """
    if api_key_env is None:
        return None
    key = os.environ.get(api_key_env, "").strip()
    if not key:
        raise MissingApiKeyError(
            f"api_key_env names ${api_key_env}, which is unset or empty where the ingress runs: the endpoint would be "
            f"open. Set {api_key_env} (a runtime_env env var, or Kubernetes Secret musiclora-api) or ask for an open "
            "endpoint explicitly with `api_key_env: null` in serve/config.yaml"
        )
    return key


def ingress_settings(settings: dict[str, Any], api_key_env: str | None) -> ApiSettings:
    """The ingress's `ApiSettings`, with the key from `$api_key_env` (see `read_api_key`).

    Raises:
        MissingApiKeyError: as `read_api_key`.
    """
    return ApiSettings.model_validate({**settings, "api_key": read_api_key(api_key_env)})


class _AdapterSlot:
    """What the multiplex LRU holds per adapter; on eviction the host detaches it once idle."""

    def __init__(self, host: ModelHost, adapter_id: str):
        self.host, self.adapter_id, self._released = host, adapter_id, False

    def __del__(self) -> None:  # Serve calls this on LRU eviction (and Python again at collection)
        if not self._released:
            self._released = True
            self.host.uncache(self.adapter_id)


@serve.deployment(
    name="Model",
    max_ongoing_requests=8,
    max_queued_requests=32,
    backpressure_config={"status_code": 429, "retry_after_s": 2},
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                        "upscale_delay_s": 2, "downscale_delay_s": 30, "look_back_period_s": 5},
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
)
class ModelServer:
    """A replica holding one base model; adapters multiplexed by id, requests batched."""

    def __init__(self, model: dict[str, Any], registry_url: str | None):
        args = ModelArgs.model_validate(model)
        slots = args.max_adapters + args.max_batch_size if args.lora_slots is None else args.lora_slots
        self.host = ModelHost(args.family, args.base, registry_url, args.revision, args.torch_threads,
                              device=args.device, dtype=args.dtype, lora_slots=slots, slot_rank=args.slot_rank,
                              slot_targets=args.slot_targets)

        async def load_adapter(adapter_id: str) -> _AdapterSlot:
            local = await asyncio.to_thread(self.host.fetch, adapter_id)
            await asyncio.get_running_loop().run_in_executor(self.host.executor, self.host.attach, adapter_id, local)
            return _AdapterSlot(self.host, adapter_id)

        # wired per instance so `max_adapters` comes from the config (Serve detects it at init)
        self._get_adapter = serve.multiplexed(max_num_models_per_replica=args.max_adapters)(load_adapter)
        self.batcher = MixedBatcher(self._run_batch, args.max_batch_size, args.batch_wait_timeout_s)

    async def generate(self, params: GenParams) -> GenResult:
        """Generate one clip with the request's multiplexed adapter ('' = the base model)."""
        adapter_id = serve.get_multiplexed_model_id() or None
        if adapter_id is not None:
            await self._get_adapter(adapter_id)
            self.host.hold(adapter_id)  # no await since the load: the LRU cannot have dropped it
        result = await self.batcher.submit((adapter_id, params))
        if isinstance(result, Exception):
            raise result
        return result

    async def _run_batch(self, items: list[tuple[str | None, GenParams]]) -> list[GenResult | Exception]:
        return await asyncio.get_running_loop().run_in_executor(self.host.executor, self.host.run, items)

    def adapters(self) -> list[str]:
        """Adapter ids attached on this replica."""
        return self.host.attached()


class RayBackend:
    """`serve.api.Backend` over the model deployments' handles."""

    def __init__(self, handles: dict[str, DeploymentHandle]):
        self.handles = handles

    async def generate(self, model: str, adapter: AdapterVersion | None, params: GenParams) -> GenResult:
        from ray.exceptions import RayTaskError
        from ray.serve.exceptions import BackPressureError

        handle = self.handles[model]
        if adapter is not None:
            handle = handle.options(multiplexed_model_id=adapter.ref)
        try:
            return await handle.generate.remote(params)
        except BackPressureError as exc:
            raise Overloaded(getattr(exc, "retry_after_s", None)) from exc
        except RayTaskError as exc:  # re-raise what the replica raised (AdapterNotFoundError ...)
            cause = exc.cause if isinstance(exc.cause, Exception) else None
            if cause is None:
                raise
            raise cause from exc


@serve.deployment(
    name=INGRESS,
    max_ongoing_requests=256,
    max_queued_requests=256,
    backpressure_config={"status_code": 429, "retry_after_s": 2},
    ray_actor_options={"num_cpus": 0.1},
)
@serve.ingress()
class Ingress:
    """HTTP ingress: the FastAPI app of serve/api.py over `RayBackend`."""

    def __init__(self, handles: dict[str, DeploymentHandle], settings: dict[str, Any], api_key_env: str | None):
        self.settings = ingress_settings(settings, api_key_env)  # fails closed: no ingress without the key
        self.backend = RayBackend(handles)

    def __serve_build_asgi_app__(self):
        return build_api(self.backend, self.settings)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application for `serve run serve/config.yaml`: Ingress + `Model-<name>` per model.

    Raises:
        pydantic.ValidationError: bad `args` (names the key), before anything is deployed.
    """
    a = AppArgs.model_validate(args)
    handles = {
        m.name: ModelServer.options(name=MODEL_PREFIX + m.name).bind(m.model_dump(), a.registry_url)
        for m in a.models
    }
    settings = {
        "models": [ServedModel.model_validate(m.model_dump(include=set(ServedModel.model_fields))).model_dump()
                   for m in a.models],
        "registry_url": a.registry_url,
        "limits": a.limits.model_dump(),
        "registry_cache_s": a.registry_cache_s,
    }
    return Ingress.bind(handles, settings, a.api_key_env)
