"""`train_loop_per_worker`: what each Ray Train worker runs, top to bottom.

load base -> LoRA -> (resume adapter from the last checkpoint) -> deepspeed.initialize ->
stream batches from the shards (this rank's share) -> step -> report -> checkpoint.

Checkpoints hold the adapter (`adapter_model.safetensors`, `adapter_config.json`) and
`state.json` (step, samples seen, losses): safetensors + JSON only, nothing pickled.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from musiclora.adapters import apply_lora, lora_state_dict, trainable_report
from musiclora.config import TrainConfig
from musiclora.data.shards import ShardStream, batches_forever, load_manifest, shard_urls
from musiclora.models.registry import get_family
from musiclora.train.deepspeed import build_ds_config, model_dtype
from musiclora.train.schedule import lr_at

STATE = "state.json"


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; `config` is `TrainConfig.model_dump()`."""
    import deepspeed
    import ray.train
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    cfg = TrainConfig.model_validate(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    family = get_family(cfg.model.family)
    torch.manual_seed(cfg.data.seed + rank)

    # 1. Base model + LoRA; only lora_ parameters train.
    loaded = family.load(cfg.model.base, revision=cfg.model.revision)
    model = apply_lora(loaded.model, family, cfg.adapter)
    state = {"step": 0, "samples": 0, "losses": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            set_peft_model_state_dict(family.lora_root(model), load_file(str(Path(d) / "adapter_model.safetensors")))
            state = json.loads((Path(d) / STATE).read_text())
    model = model.to(model_dtype(cfg)).train()
    if rank == 0:
        print(f"[musiclora] LoRA {trainable_report(model)}; resuming at step {state['step']}", flush=True)

    # 2. DeepSpeed ZeRO over the trainable parameters (torch.distributed is already up: gloo or nccl).
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=build_ds_config(cfg))

    # 3. This rank's share of the shards, as an endless stream of batches (same count on every rank).
    manifest = load_manifest(cfg.data.shards_url)
    stream = ShardStream(
        shard_urls(cfg.data.shards_url, "train", manifest), rank=rank, world_size=world,
        seed=cfg.data.seed + state["step"], shuffle_buffer=cfg.data.shuffle_buffer,
    )
    batches = batches_forever(stream, cfg.data.batch_size, lambda s: family.collate(s, loaded), cfg.data.loader_workers)

    # 4. The loop: one optimizer step per `grad_accum` micro-batches.
    window_start, window_samples, wait_s = time.time(), 0, 0.0
    while state["step"] < cfg.optim.max_steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(state["step"], cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.max_steps)
        losses, step_samples = [], 0
        for _ in range(cfg.optim.grad_accum):
            t0 = time.time()
            batch = next(batches)
            wait_s += time.time() - t0
            loss = family.loss(engine, batch)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            step_samples += cfg.data.batch_size
        window_samples += step_samples
        state["step"] += 1
        state["samples"] += step_samples * world
        state["losses"].append(sum(losses) / len(losses))
        if state["step"] % cfg.run.log_every == 0 or state["step"] == cfg.optim.max_steps:
            elapsed = max(time.time() - window_start, 1e-9)
            metrics = {
                "step": state["step"], "loss": state["losses"][-1], "lr": optimizer.param_groups[0]["lr"],
                "samples_per_s": window_samples * world / elapsed, "data_wait_frac": wait_s / elapsed,
            }
            done = state["step"] == cfg.optim.max_steps
            if state["step"] % cfg.run.checkpoint_every == 0 or done:
                _report_with_checkpoint(engine, cfg, family, rank, state, metrics)
            else:
                ray.train.report(metrics)
            window_start, window_samples, wait_s = time.time(), 0, 0.0


def _gathered_lora(engine, cfg: TrainConfig, family) -> dict[str, torch.Tensor]:
    """Full adapter tensors on every rank (under ZeRO-3 the local ones are empty partitions)."""
    import deepspeed

    module = family.lora_root(engine.module)
    if cfg.deepspeed.zero_stage == 3:
        lora = [p for n, p in module.named_parameters() if "lora_" in n]
        with deepspeed.zero.GatheredParameters(lora, modifier_rank=None):
            return {k: v.float() for k, v in lora_state_dict(module).items()}
    return {k: v.float() for k, v in lora_state_dict(module).items()}


def _report_with_checkpoint(engine, cfg: TrainConfig, family, rank: int, state: dict, metrics: dict) -> None:
    import ray.train
    from ray.train import Checkpoint

    tensors = _gathered_lora(engine, cfg, family)  # collective: every rank takes part
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        family.lora_root(engine.module).save_pretrained(tmp, state_dict=tensors, safe_serialization=True)
        Path(tmp, STATE).write_text(json.dumps(state))
        Path(tmp, "config.json").write_text(json.dumps(cfg.model_dump(), indent=2))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
