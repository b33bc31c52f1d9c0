"""`train_loop_per_worker`: what each Ray Train worker runs, top to bottom.

load base -> LoRA -> resume from the last checkpoint -> deepspeed.initialize -> stream this
rank's batches -> step -> (validate, early-stop) -> report -> checkpoint.

Checkpoints are safetensors + JSON only (see `checkpoint.py`). A worker that dies is replaced
by Ray Train (FailureConfig) and the group resumes from the last checkpoint; re-running the same
run name under the same storage path resumes too.
"""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any

import torch

from musiclora.adapters import apply_lora, trainable_report
from musiclora.config import TrainConfig
from musiclora.data.shards import ShardStream, batches_forever, load_manifest, shard_urls
from musiclora.models.families import get_family
from musiclora.train import checkpoint as ckpt
from musiclora.train.deepspeed import build_ds_config, build_optimizer, model_dtype
from musiclora.train.device import batch_to_device, deepspeed_args, local_device, set_ds_accelerator
from musiclora.train.schedule import lr_at
from musiclora.train.validate import load_val_batches, validation_loss

STATE = ckpt.STATE


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; `config` is `TrainConfig.model_dump()`."""
    cfg = TrainConfig.model_validate(config)
    set_ds_accelerator(cfg.run.use_gpu)  # before DeepSpeed picks its accelerator
    import deepspeed
    import ray.train
    from peft import set_peft_model_state_dict

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    family = get_family(cfg.model.family)
    family.configure(cfg.model.options)
    torch.manual_seed(cfg.data.seed + rank)

    # 1. Base model + LoRA (only lora_ parameters train), then the last checkpoint if any.
    loaded = family.load(cfg.model.base, revision=cfg.model.revision)
    model = apply_lora(loaded.model, family, cfg.adapter)
    if cfg.optim.gradient_checkpointing:
        family.enable_gradient_checkpointing(model)
    state, best = ckpt.new_state(), None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            tensors, best, state = ckpt.read_checkpoint(d)
        set_peft_model_state_dict(family.lora_root(model), tensors)
    model = model.to(model_dtype(cfg)).train()
    if rank == 0:
        print(f"[musiclora] run {cfg.run.name}: LoRA {trainable_report(model)}; starting at step {state['step']}",
              flush=True)

    # 2. DeepSpeed ZeRO over the trainable parameters (torch.distributed is already up: gloo or nccl).
    # The engine moves the model to this worker's device (its GPU under use_gpu, else the CPU).
    optimizer = build_optimizer(model, cfg)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=build_ds_config(cfg),
                                                   args=deepspeed_args(local_device()))

    # 3. This rank's share of the shards, as an endless stream of batches (same count on every rank).
    collate = lambda samples: family.collate(samples, loaded)
    manifest = load_manifest(cfg.data.shards_url)
    stream = ShardStream(shard_urls(cfg.data.shards_url, "train", manifest), rank=rank, world_size=world,
                         seed=cfg.data.seed + state["step"], shuffle_buffer=cfg.data.shuffle_buffer)
    batches = batches_forever(stream, cfg.data.batch_size, collate, cfg.data.loader_workers)
    val_batches = []
    if cfg.run.eval_every and manifest["num_samples"].get("val", 0):
        val_batches = load_val_batches(shard_urls(cfg.data.shards_url, "val", manifest), rank, world,
                                       cfg.data.batch_size, collate, cfg.data.val_batches, device=engine.device)

    # 4. The loop: one optimizer step per `grad_accum` micro-batches.
    window = {"t0": time.time(), "samples": 0, "tokens": 0, "wait": 0.0}
    while state["step"] < cfg.optim.max_steps and not state["stopped_early"]:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(state["step"], cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.max_steps)
        losses = []
        for _ in range(cfg.optim.grad_accum):
            t0 = time.time()
            batch = next(batches)
            window["wait"] += time.time() - t0
            loss = train_step(engine, family, batch)
            losses.append(loss.item())
            window["samples"] += cfg.data.batch_size * world
            window["tokens"] += family.num_tokens(batch) * world
        state["step"] += 1
        state["samples"] += cfg.data.batch_size * cfg.optim.grad_accum * world
        state["losses"].append(sum(losses) / len(losses))
        metrics = {"step": state["step"], "loss": state["losses"][-1], "lr": optimizer.param_groups[0]["lr"]}

        improved = False
        if val_batches and state["step"] % cfg.run.eval_every == 0:
            improved = _validate(engine, family, val_batches, cfg, state, metrics)
            if improved:
                best = ckpt.gather_lora(engine, family.lora_root(engine.module), cfg.deepspeed.zero_stage)

        done = state["step"] >= cfg.optim.max_steps or state["stopped_early"]
        if state["step"] % cfg.run.log_every == 0 or done:
            elapsed = max(time.time() - window["t0"], 1e-9)
            metrics.update(samples_per_s=window["samples"] / elapsed, tokens_per_s=window["tokens"] / elapsed,
                           data_wait_frac=window["wait"] / elapsed)
            window = {"t0": time.time(), "samples": 0, "tokens": 0, "wait": 0.0}
            if rank == 0:
                print(f"[musiclora] step {state['step']}/{cfg.optim.max_steps} " + " ".join(
                    f"{k}={v:.4g}" for k, v in metrics.items() if k != "step"), flush=True)
        if state["step"] % cfg.run.checkpoint_every == 0 or done:
            _report_with_checkpoint(engine, cfg, family, rank, state, metrics, best)
        elif state["step"] % cfg.run.log_every == 0:
            ray.train.report(metrics)


def train_step(engine, family, batch: dict[str, Any]) -> torch.Tensor:
    """One micro-step: move the batch to the engine's device, loss, backward, step.

    Args:
        engine: the DeepSpeed engine (anything with `device`, `backward`, `step`, and a forward).
        family: the model family whose `loss` runs.
        batch: the family's `collate` output, on the CPU as the loader yields it.

    Returns:
        The float32 scalar loss on the engine's device (not yet synchronised to the host).
    """
    loss = family.loss(engine, batch_to_device(batch, engine.device))
    engine.backward(loss)
    engine.step()
    return loss


def _validate(engine, family, val_batches, cfg: TrainConfig, state: dict, metrics: dict) -> bool:
    """Run validation, update early-stopping counters; True when this is the best so far."""
    val = validation_loss(engine, family, val_batches)
    metrics["val_loss"] = val
    state["val"].append([state["step"], val])
    best = state["best"]
    improved = best is None or val < best["val_loss"] - cfg.run.min_delta
    if improved:
        state["best"], state["bad_evals"] = {"step": state["step"], "val_loss": val}, 0
    else:
        state["bad_evals"] += 1
        if cfg.run.early_stopping_patience and state["bad_evals"] >= cfg.run.early_stopping_patience:
            state["stopped_early"] = True
    metrics["best_val_loss"] = state["best"]["val_loss"] if state["best"] else math.nan
    return improved


def _report_with_checkpoint(engine, cfg: TrainConfig, family, rank: int, state: dict, metrics: dict, best) -> None:
    import ray.train
    from ray.train import Checkpoint

    root = family.lora_root(engine.module)
    tensors = ckpt.gather_lora(engine, root, cfg.deepspeed.zero_stage)  # collective: every rank takes part
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt.write_checkpoint(tmp, root, tensors, best, state)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
