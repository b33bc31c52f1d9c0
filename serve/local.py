"""The API without Ray: `ModelHost`s in this process behind the same FastAPI app.

For tests, the web page's development and a laptop: `python -m serve.local --base tiny --port 33080`.
Production runs `serve run serve/config.yaml` (serve/app.py), which adds multiplexing across
replicas, batching and autoscaling around the same `ModelHost` and API.
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from functools import partial

from musiclora.adapter_registry import AdapterVersion
from serve.api import ApiSettings, Limits, ServedModel, build_api
from serve.batcher import MixedBatcher
from serve.host import GenParams, GenResult, ModelHost


class LocalBackend:
    """Runs requests on in-process `ModelHost`s, with an LRU of `max_adapters` adapters per host and
    one `MixedBatcher` per host (requests for any adapters batched together).

    Args:
        hosts: served model name -> its host.
        max_adapters: adapters kept attached per host.
        max_batch_size / batch_wait_timeout_s: the batcher's (see `serve.batcher.MixedBatcher`).
    """

    def __init__(self, hosts: dict[str, ModelHost], max_adapters: int = 4, max_batch_size: int = 4,
                 batch_wait_timeout_s: float = 0.05):
        self.hosts, self.max_adapters = hosts, max_adapters
        self.batchers = {name: MixedBatcher(partial(self._run_batch, host), max_batch_size, batch_wait_timeout_s)
                         for name, host in hosts.items()}
        self._lru: dict[str, OrderedDict[str, None]] = {name: OrderedDict() for name in hosts}
        self._locks = {name: asyncio.Lock() for name in hosts}

    async def _ensure(self, model: str, adapter_id: str) -> None:
        host, lru = self.hosts[model], self._lru[model]
        async with self._locks[model]:
            if adapter_id in lru:
                lru.move_to_end(adapter_id)
                return
            local = await asyncio.to_thread(host.fetch, adapter_id)
            await asyncio.get_running_loop().run_in_executor(host.executor, host.attach, adapter_id, local)
            lru[adapter_id] = None
            while len(lru) > self.max_adapters:
                host.uncache(lru.popitem(last=False)[0])

    async def generate(self, model: str, adapter: AdapterVersion | None, params: GenParams) -> GenResult:
        """Generate one clip on `model`'s host (see `serve.api.Backend`)."""
        host = self.hosts[model]
        adapter_id = adapter.ref if adapter else None
        if adapter_id:
            await self._ensure(model, adapter_id)
            host.hold(adapter_id)
        result = await self.batchers[model].submit((adapter_id, params))
        if isinstance(result, Exception):
            raise result
        return result

    @staticmethod
    async def _run_batch(host: ModelHost, items: list[tuple[str | None, GenParams]]) -> list[GenResult | Exception]:
        return await asyncio.get_running_loop().run_in_executor(host.executor, host.run, items)


def build_local_api(models: list[ServedModel], registry_url: str | None = None, limits: Limits | None = None,
                    api_key: str | None = None, torch_threads: int | None = None, max_adapters: int = 4,
                    device: str | None = None, lora_slots: int | None = None):
    """A FastAPI app serving `models` from this process (each base loaded once here, on `device`:
    cpu, cuda or cuda:N; None: cuda if available, else cpu; `lora_slots`: see `ModelHost`, default
    max_adapters + 4)."""
    slots = max_adapters + 4 if lora_slots is None else lora_slots
    hosts = {m.name: ModelHost(m.family, m.base, registry_url, torch_threads=torch_threads, device=device,
                               lora_slots=slots) for m in models}
    settings = ApiSettings(models=models, registry_url=registry_url, limits=limits or Limits(), api_key=api_key)
    return build_api(LocalBackend(hosts, max_adapters), settings)


def main() -> None:
    import argparse

    import uvicorn

    p = argparse.ArgumentParser(description="Serve the musiclora API from this process (no Ray).")
    p.add_argument("--family", default="musicgen-melody")
    p.add_argument("--base", default="tiny")
    p.add_argument("--name", default=None, help="model name in the API (default: the family)")
    p.add_argument("--registry", default=None, help="registry root URL (default: $MUSICLORA_REGISTRY_URL)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=33080)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--open", action="store_true", help="serve without an API key (else $MUSICLORA_API_KEY is required)")
    a = p.parse_args()
    key = None if a.open else os.environ.get("MUSICLORA_API_KEY", "").strip()
    if key == "":
        p.error("$MUSICLORA_API_KEY is unset or empty: set it, or pass --open to serve without a key")
    model = ServedModel(name=a.name or a.family, family=a.family, base=a.base, base_aliases=["*"])
    app = build_local_api([model], a.registry, api_key=key,
                          torch_threads=a.threads, device=a.device)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
