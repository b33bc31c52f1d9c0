"""Training-step benchmark: prints one JSON object per configuration, then a summary JSON.

    python bench/train_step.py [--family musicgen-melody] [--base tiny] [--steps 8] [--quick]
                               [--shards URL] [--device cpu|cuda] [--peak-tflops 989]

Grid: LoRA vs full fine-tuning of the same model, 1 vs 2 workers (gloo/nccl processes),
ZeRO-2 vs ZeRO-3, fp32 vs bf16. Each configuration runs in fresh processes through the same
family / LoRA / DeepSpeed code the trainer uses. Figures per configuration: samples/s (all
workers), step time, peak resident memory per worker (CPU: ru_maxrss; CUDA: max allocated),
data-wait fraction (time blocked on the next batch / wall time), and on CUDA the model FLOPs
utilisation: MFU = achieved FLOP/s / peak, with FLOPs per token = 6 N for full fine-tuning and
4 N + 6 N_lora for LoRA (forward 2N, activation gradients 2N, weight gradients only for trained
parameters; Kaplan et al. 2020 / PaLM appendix B convention). A token is one position of the
network: for MusicGen one codec frame (its K codebooks are summed into one decoder position).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import socket
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _synthetic_samples(family, loaded, n: int, seconds: float):
    import io

    import numpy as np

    from musiclora.models.base import Segment

    rng = np.random.default_rng(0)
    sr = family.sample_rate
    segs = [Segment(f"s{i}", (0.1 * rng.standard_normal(int(seconds * sr))).astype(np.float32), int(seconds * sr),
                    "orchestral game soundtrack") for i in range(n)]
    out = []
    for raw in family.encode_segments(loaded, segs):
        out.append({k: (np.load(io.BytesIO(v)) if k.endswith(".npy") else v) for k, v in raw.items()})
    return out


def _worker(rank: int, world: int, port: int, spec: dict, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import deepspeed

    from musiclora.adapters import apply_lora
    from musiclora.config import AdapterConfig, TrainConfig
    from musiclora.data.shards import ShardStream, batches_forever, load_manifest, shard_urls
    from musiclora.models.families import get_family
    from musiclora.train.deepspeed import build_ds_config
    from musiclora.train.loop import train_step

    cuda = spec["device"] == "cuda"
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(rank)
    family = get_family(spec["family"])
    loaded = family.load(spec["base"])
    model = loaded.model
    if spec["mode"] == "lora":
        model = apply_lora(model, family, AdapterConfig())
    else:
        for p in family.lora_root(model).parameters():
            p.requires_grad_(True)
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    model = model.to(dtype).train()
    n_total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = TrainConfig.model_validate({
        "data": {"shards_url": spec.get("shards") or "file:///none", "batch_size": spec["batch_size"]},
        "deepspeed": {"zero_stage": spec["zero_stage"], "precision": spec["precision"]},
        "run": {"storage_path": "file:///tmp", "adapters_url": "file:///tmp"}})
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-4),
                                      config=build_ds_config(cfg))
    collate = lambda s: family.collate(s, loaded)
    if spec.get("shards"):
        stream = ShardStream(shard_urls(spec["shards"], "train", load_manifest(spec["shards"])), rank, world)
        batches = batches_forever(stream, spec["batch_size"], collate)
    else:
        samples = _synthetic_samples(family, loaded, spec["batch_size"], spec["seconds"])
        batches = itertools.repeat(collate(samples))
    wait = tokens = 0.0
    for step in range(spec["warmup"] + spec["steps"]):
        if step == spec["warmup"]:
            if cuda:
                torch.cuda.synchronize()
            t_start, wait, tokens = time.time(), 0.0, 0
        t0 = time.time()
        batch = next(batches)
        wait += time.time() - t0
        loss = train_step(engine, family, batch)  # the product's step: batch to the engine's device, loss, step
        # decoder positions: MusicGen sums its K codebooks into one position (MFU counts FLOPs per position)
        tokens += family.num_tokens(batch) // (int(batch["codes"].shape[1]) if "codes" in batch else 1)
    if cuda:
        torch.cuda.synchronize()
    wall = time.time() - t_start
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put({"rank": rank, "wall_s": wall, "wait_s": wait, "tokens": tokens, "peak_bytes": peak,
               "params_total": n_total, "params_trained": n_train, "loss": float(loss)})


def run_config(spec: dict) -> dict:
    """Run one configuration in `spec["workers"]` fresh processes; returns its figures."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, spec["workers"], port, spec, queue)) for r in range(spec["workers"])]
    for p in procs:
        p.start()
    results = [queue.get(timeout=900) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    wall = max(r["wall_s"] for r in results)
    samples = spec["steps"] * spec["batch_size"] * spec["workers"]
    out = {**{k: spec[k] for k in ("family", "mode", "workers", "zero_stage", "precision", "batch_size")},
           "samples_per_s": samples / wall, "step_time_s": wall / spec["steps"],
           "tokens_per_s": sum(r["tokens"] for r in results) / wall,
           "peak_mem_mb_per_worker": max(r["peak_bytes"] for r in results) / 2**20,
           "data_wait_frac": max(r["wait_s"] for r in results) / wall,
           "params_total": results[0]["params_total"], "params_trained": results[0]["params_trained"]}
    if spec["device"] == "cuda" and spec.get("peak_tflops"):
        n, nt = out["params_total"], out["params_trained"]
        per_token = 6 * n if spec["mode"] == "full" else 4 * n + 6 * nt
        out["mfu"] = per_token * out["tokens_per_s"] / (spec["peak_tflops"] * 1e12 * spec["workers"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="musicgen-melody")
    ap.add_argument("--base", default="tiny")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=4.0, help="clip length of synthetic samples")
    ap.add_argument("--shards", default=None, help="stream real shards from this URL instead of synthetic batches")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU (H100 bf16 dense: 989)")
    ap.add_argument("--quick", action="store_true", help="LoRA/full x ZeRO-2 x fp32 x 1,2 workers only")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if args.device == "cuda" else "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(tempfile.gettempdir(), "musiclora_torch_ext"))
    grid = itertools.product(["lora", "full"], [1, 2], [2] if args.quick else [2, 3],
                             ["fp32"] if args.quick else ["fp32", "bf16"])
    rows = []
    for mode, workers, zero, precision in grid:
        spec = dict(family=args.family, base=args.base, mode=mode, workers=workers, zero_stage=zero,
                    precision=precision, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                    seconds=args.seconds, shards=args.shards, device=args.device, peak_tflops=args.peak_tflops)
        row = run_config(spec)
        rows.append(row)
        print(json.dumps(row), flush=True)
    lora = {(r["workers"], r["zero_stage"], r["precision"]): r for r in rows if r["mode"] == "lora"}
    speedups = [lora[k]["samples_per_s"] / r["samples_per_s"] for r in rows if r["mode"] == "full"
                for k in [(r["workers"], r["zero_stage"], r["precision"])] if k in lora]
    print(json.dumps({"summary": {"configs": len(rows), "lora_vs_full_speedup_mean": sum(speedups) / len(speedups),
                                  "device": args.device, "torch": torch.__version__}}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
