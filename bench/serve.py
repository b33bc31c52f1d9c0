"""Serving benchmark: latency and throughput of `serve run serve/config.yaml` over real HTTP.

    .venv/bin/python bench/serve.py [--requests 16] [--concurrency 4] [--duration-s 1.0] [--cold 4]
                                    [--replicas 1] [--out bench-serve.json]

Starts the embedded S3 store and a Ray head on 127.0.0.1 (free ports), publishes train-free
adapters (random LoRA B on the tiny MusicGen-Melody) to the registry, runs the shipped
serve/config.yaml (replicas pinned to `--replicas`, `max_adapters` 2) and measures three cases,
each sequentially (1 client) and with `--concurrency` clients:

- `base`: no adapter;
- `warm_adapter`: one adapter already loaded on the replica;
- `cold_adapter`: every request names an adapter the replica has never loaded (registry
  download + peft attach on the request's path).

Prints one JSON object: per case and mode, p50/p95 latency (s, client side), requests/s
(requests / wall time), request count and status codes. Everything is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "src")]

from musiclora.adapter_registry import Registry
from musiclora.local_ray import LocalRay
from musiclora.models.families import get_family
from musiclora.storage import ensure_bucket
from musiclora.store import EmbeddedStore, find_free_s3_port
from serve.deploy import ServeRun, replicas, write_config
from tests.serve_helpers import make_random_adapter


def _free_port(width: int = 1) -> int:
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + width < 65535 and all(_port_free(p) for p in range(base, base + width)):
            return base
    raise RuntimeError("no free port block on 127.0.0.1")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def run_case(url: str, adapters: list[str | None], concurrency: int, duration_s: float) -> dict:
    """Send one request per entry of `adapters` from `concurrency` clients; latency and throughput."""
    import httpx

    todo = list(enumerate(adapters))
    lock, latencies, codes = threading.Lock(), [], Counter()

    def client() -> None:
        with httpx.Client(timeout=300, trust_env=False) as c:
            while True:
                with lock:
                    if not todo:
                        return
                    i, adapter = todo.pop(0)
                body = {"prompt": "calm piano with strings", "duration_s": duration_s, "seed": i, "adapter": adapter}
                start = time.perf_counter()
                r = c.post(url + "/v1/generate", json=body)
                took = time.perf_counter() - start
                with lock:
                    codes[r.status_code] += 1
                    if r.status_code == 200:
                        latencies.append(took)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {"requests": len(adapters), "concurrency": concurrency, "p50_s": round(float(np.percentile(lat, 50)), 4),
            "p95_s": round(float(np.percentile(lat, 95)), 4), "requests_per_s": round(len(latencies) / wall, 3),
            "wall_s": round(wall, 2), "status": {str(k): v for k, v in sorted(codes.items())}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=16, help="requests per case and mode (base, warm)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--duration-s", type=float, default=1.0, help="seconds of audio per request")
    p.add_argument("--cold", type=int, default=4, help="cold adapters per mode (each requested once)")
    p.add_argument("--replicas", type=int, default=1, help="model replicas (autoscaling pinned to this)")
    p.add_argument("--workdir", default=None, help="state folder (default: a temp folder, removed)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args()

    work = Path(a.workdir or tempfile.mkdtemp(prefix="musiclora-bench-serve-"))
    store = EmbeddedStore(work / "store", s3_port=find_free_s3_port())
    head = LocalRay(work / "ray", gcs_port=_free_port(), dashboard_port=_free_port(3), num_cpus=max(2, a.replicas + 1))
    run = None
    try:
        store.start(timeout_s=120)
        os.environ.update(store.env())
        bucket = f"s3://bench-{uuid.uuid4().hex[:8]}"
        ensure_bucket(bucket)
        registry = Registry(f"{bucket}/registry")
        base = get_family("musicgen-melody").save_tiny(str(work / "tiny"))
        names = ["warm"] + [f"cold{i}" for i in range(2 * a.cold)]
        t0 = time.perf_counter()
        for seed, name in enumerate(names, start=1):
            registry.publish(make_random_adapter(base, str(work / "src" / name), seed), name)
        publish_s = (time.perf_counter() - t0) / len(names)

        head_env = {**store.env(), "PYTHONPATH": str(REPO / "src"), "TOKENIZERS_PARALLELISM": "false"}
        try:
            head.start(extra_env=head_env)
        except RuntimeError:  # a busy machine sometimes fails Ray's start-up (dashboard modules): once more
            head.start(extra_env=head_env)
        auto = {"min_replicas": a.replicas, "max_replicas": a.replicas, "initial_replicas": a.replicas}
        config = write_config(
            work / "config.yaml", _free_port(),
            args={"registry_url": registry.url, "api_key_env": None,
                  "models": [{"name": "musicgen-melody", "family": "musicgen-melody", "base": base, "max_adapters": 2}],
                  "limits": {"max_pending": 256}},
            deployments={"Model-musicgen-melody": {"autoscaling_config": auto}},
        )
        run = ServeRun(config, head.address, env={k: v for k, v in head.env().items() if k != "RAY_ADDRESS"})
        t0 = time.perf_counter()
        run.start(timeout_s=600)
        token = head.token_file.read_text().strip()
        while replicas(head.dashboard_url, token, "Model-musicgen-melody")["states"] != {"RUNNING": a.replicas}:
            time.sleep(1)
        startup_s = time.perf_counter() - t0

        run_case(run.url, [None, "warm"], 1, a.duration_s)  # warm-up: first request, warm adapter loaded
        results: dict[str, dict] = {}
        cold = iter(names[1:])
        for mode, conc in (("sequential", 1), ("concurrent", a.concurrency)):
            results.setdefault("base", {})[mode] = run_case(run.url, [None] * a.requests, conc, a.duration_s)
            results.setdefault("warm_adapter", {})[mode] = run_case(run.url, ["warm"] * a.requests, conc, a.duration_s)
            results.setdefault("cold_adapter", {})[mode] = run_case(
                run.url, [next(cold) for _ in range(a.cold)], conc, a.duration_s)
        out = {
            "benchmark": "serve", "device": "cpu", "model": "tiny musicgen-melody (random weights)",
            "duration_s": a.duration_s, "replicas": a.replicas, "max_adapters_per_replica": 2,
            "app_startup_s": round(startup_s, 1), "publish_s_per_adapter": round(publish_s, 2), **results,
        }
    finally:
        if run is not None:
            run.stop()
        head.stop()
        store.stop()
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
