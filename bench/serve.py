"""Serving benchmark: throughput and latency of `serve run serve/config.yaml` over real HTTP,
requests for one adapter, for 8 distinct adapters and for the base, plus adapter load times.

    .venv/bin/python bench/serve.py [--requests 16] [--duration-s 1.0] [--loads 100] [--out bench-serve.json]

Starts the embedded S3 store and a Ray head on 127.0.0.1 (free ports), publishes 8 train-free
adapters (random LoRA B on the tiny MusicGen-Melody) to the registry, runs the shipped
serve/config.yaml with one model replica (max_adapters 8, max_batch_size 8: a batch mixes
adapters) and, per case and at 1, 4 and 8 concurrent clients, sends `--requests` requests:

- `one_adapter`: every request names the same adapter;
- `eight_adapters`: request i names adapter i % 8;
- `base`: no adapter.

Per case and concurrency: clips/s and generated audio-seconds/s (over the wall time), p50/p95
latency (client side), the mean batch size the replica reported, status codes.

`adapter_load`: the replica's attach (ModelHost.attach, on its model thread, registry download
excluded) for `--loads` adapters that all stay resident, with LoRA slots (the served path) and
with peft's own `load_adapter` (slots off): the first load, the last, and their ratio.

Prints one JSON object with the load average before and after. Everything is stopped at the end.
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
    """Send one request per entry of `adapters` from `concurrency` clients; throughput and latency."""
    import httpx

    todo = list(enumerate(adapters))
    lock, latencies, codes, batches = threading.Lock(), [], Counter(), []

    def client() -> None:
        with httpx.Client(timeout=600, trust_env=False) as c:
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
                        batches.append(int(r.headers["x-musiclora-batch-size"]))

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {"requests": len(adapters), "concurrency": concurrency,
            "clips_per_s": round(len(latencies) / wall, 3), "audio_s_per_s": round(len(latencies) * duration_s / wall, 3),
            "p50_s": round(float(np.percentile(lat, 50)), 3), "p95_s": round(float(np.percentile(lat, 95)), 3),
            "mean_batch_size": round(float(np.mean(batches)), 2) if batches else None,
            "wall_s": round(wall, 2), "status": {str(k): v for k, v in sorted(codes.items())}}


def adapter_load_times(base: str, adapter_dir: str, loads: int, registry_url: str) -> dict:
    """Attach `loads` copies of an adapter that all stay resident, timed on the host's model thread."""
    from serve.host import ModelHost

    out = {}
    for label, slots in (("lora_slots", loads), ("peft_load_adapter", 0)):
        t0 = time.perf_counter()
        host = ModelHost("musicgen-melody", base, registry_url, torch_threads=1, lora_slots=slots)
        startup = time.perf_counter() - t0
        times = []
        for i in range(loads):
            local = tempfile.mkdtemp(prefix="bench-load-")
            shutil.copytree(adapter_dir, local, dirs_exist_ok=True)

            def attach(adapter_id=f"a{i}@1", local=local, host=host):
                start = time.perf_counter()
                host.attach(adapter_id, local)
                return time.perf_counter() - start

            times.append(host.executor.submit(attach).result())
        host.executor.shutdown()
        out[label] = {"loads": loads, "first_ms": round(1000 * times[0], 2), "last_ms": round(1000 * times[-1], 2),
                      "median_ms": round(1000 * float(np.median(times)), 2),
                      "last_over_first": round(times[-1] / times[0], 2),
                      "last_over_median_first10": round(times[-1] / float(np.median(times[:10])), 2),
                      "host_startup_s": round(startup, 2)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=16, help="requests per case and concurrency")
    p.add_argument("--duration-s", type=float, default=1.0, help="seconds of audio per request")
    p.add_argument("--loads", type=int, default=100, help="adapters attached for the load-time figure")
    p.add_argument("--workdir", default=None, help="state folder (default: a temp folder, removed)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args()

    load_before = os.getloadavg()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="musiclora-bench-serve-"))
    store = EmbeddedStore(work / "store", s3_port=find_free_s3_port())
    head = LocalRay(work / "ray", gcs_port=_free_port(), dashboard_port=_free_port(3), num_cpus=2)
    run = None
    try:
        store.start(timeout_s=120)
        os.environ.update(store.env())
        bucket = f"s3://bench-{uuid.uuid4().hex[:8]}"
        ensure_bucket(bucket)
        registry = Registry(f"{bucket}/registry")
        base = get_family("musicgen-melody").save_tiny(str(work / "tiny"))
        names = [f"ad{i}" for i in range(8)]
        for seed, name in enumerate(names, start=1):
            registry.publish(make_random_adapter(base, str(work / "src" / name), seed), name)
        loads = adapter_load_times(base, str(work / "src" / names[0]), a.loads, registry.url)

        head_env = {**store.env(), "PYTHONPATH": str(REPO / "src"), "TOKENIZERS_PARALLELISM": "false"}
        try:
            head.start(extra_env=head_env)
        except RuntimeError:  # a busy machine sometimes fails Ray's start-up (dashboard modules): once more
            head.start(extra_env=head_env)
        auto = {"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1}
        config = write_config(
            work / "config.yaml", _free_port(),
            args={"registry_url": registry.url, "api_key_env": None,
                  "models": [{"name": "musicgen-melody", "family": "musicgen-melody", "base": base, "max_adapters": 8,
                              "max_batch_size": 8, "batch_wait_timeout_s": 0.05, "torch_threads": 1}],
                  "limits": {"max_pending": 256}},
            deployments={"Model-musicgen-melody": {"autoscaling_config": auto, "max_ongoing_requests": 16}},
        )
        run = ServeRun(config, head.address, env={k: v for k, v in head.env().items() if k != "RAY_ADDRESS"})
        t0 = time.perf_counter()
        run.start(timeout_s=600)
        token = head.token_file.read_text().strip()
        while replicas(head.dashboard_url, token, "Model-musicgen-melody")["states"] != {"RUNNING": 1}:
            time.sleep(1)
        startup_s = time.perf_counter() - t0

        run_case(run.url, [None, *names], 1, a.duration_s)  # warm-up: every adapter loaded once
        cases = {"one_adapter": [names[0]] * a.requests, "eight_adapters": [names[i % 8] for i in range(a.requests)],
                 "base": [None] * a.requests}
        results: dict[str, dict] = {case: {} for case in cases}
        for conc in (1, 4, 8):
            for case, adapters in cases.items():
                results[case][f"c{conc}"] = run_case(run.url, adapters, conc, a.duration_s)
        a8, b8 = results["one_adapter"]["c8"]["clips_per_s"], results["eight_adapters"]["c8"]["clips_per_s"]
        out = {
            "benchmark": "serve", "device": "cpu", "model": "tiny musicgen-melody (random weights)",
            "duration_s": a.duration_s, "replicas": 1, "max_batch_size": 8, "max_adapters_per_replica": 8,
            "torch_threads": 1, "cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before],
            "app_startup_s": round(startup_s, 1), **results,
            "targets": {"eight_over_one_adapter_at_c8": round(b8 / a8, 3) if a8 else None,
                        "one_adapter_c8_over_c1": round(a8 / results["one_adapter"]["c1"]["clips_per_s"], 3)},
            "adapter_load": loads, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
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
