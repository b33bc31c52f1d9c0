"""`train_loop_per_worker`: what each Ray Train worker runs, top to bottom.

load base -> LoRA -> resume from the last checkpoint -> deepspeed.initialize -> (validate the base:
`val_base`) -> stream this rank's batches -> step -> (validate, early-stop) -> report -> checkpoint.
Every report of a validating run carries the latest validation loss and its step (`latest_val`).

Checkpoints are safetensors + JSON only and hold everything needed to continue identically
(`checkpoint.py`): adapter, fp32 masters and AdamW moments, the step (= LR schedule position),
the data position. The data order is a pure function of (seed, position) (`data/order.py`) and
torch's generator is reseeded every step from (seed, step, rank), so a worker that dies is
replaced by Ray Train (FailureConfig), the group resumes from the last checkpoint and ends where
an uninterrupted run would, sample for sample; re-running the same run name resumes too.
"""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any

import torch

from musiclora.adapters import apply_lora, trainable_report
from musiclora.config import TrainConfig
from musiclora.data.indexed import ShardIndex, global_batches
from musiclora.data.order import data_position
from musiclora.data.shards import load_manifest
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
    state, best, opt_tensors = ckpt.new_state(), None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            tensors, best, state, opt_tensors = ckpt.read_checkpoint(d)
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
    if opt_tensors is not None:  # AdamW moments and fp32 masters, re-partitioned over this world size
        ckpt.restore_optimizer(engine, opt_tensors, state["optimizer"]["step"])

    # 3. This rank's slice of every global batch, from the checkpoint's stream position.
    collate = lambda samples: family.collate(samples, loaded)
    manifest = load_manifest(cfg.data.shards_url)
    index = ShardIndex(cfg.data.shards_url, "train", manifest)
    ckpt.check_data_position(state, index.digest, cfg.data.shards_url)
    batches = global_batches(index, rank, world, cfg.data.batch_size, cfg.data.seed, state["samples"], collate,
                             cfg.data.loader_workers, shuffle=cfg.data.shuffle_buffer > 0)
    val_batches = []
    if cfg.run.eval_every and manifest["num_samples"].get("val", 0):
        val_batches = load_val_batches(ShardIndex(cfg.data.shards_url, "val", manifest), rank, world,
                                       cfg.data.batch_size, collate, cfg.data.val_batches)

    if val_batches and state["step"] == 0 and state.get("val_base") is None:
        # The base model's held-out loss (the adapter starts as the identity): the first value every report
        # carries, so `val_loss` is in all of them (Tune's strict metric check); not a candidate for `best`.
        state["val_base"] = validation_loss(engine, family, val_batches)

    # 4. The loop: one optimizer step per `grad_accum` micro-batches.
    window = {"t0": time.time(), "samples": 0, "tokens": 0, "wait": 0.0}
    while state["step"] < cfg.optim.max_steps and not state["stopped_early"]:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(state["step"], cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.max_steps)
        torch.manual_seed(ckpt.step_seed(cfg.data.seed, state["step"], rank))  # dropout etc.: a function of the step
        losses = []
        for _ in range(cfg.optim.grad_accum):
            t0 = time.time()
            item = next(batches)
            batch = item["batch"]
            window["wait"] += time.time() - t0
            state["consumed"] += _all_ids(item["ids"], world, engine.device)
            loss = train_step(engine, family, batch)
            losses.append(loss.item())
            window["samples"] += cfg.data.batch_size * world
            window["tokens"] += family.num_tokens(batch) * world
        state["step"] += 1
        state["samples"] += cfg.data.batch_size * cfg.optim.grad_accum * world
        state["data"] = {**data_position(state["samples"], index.num_samples), "num_samples": index.num_samples,
                         "shards_digest": index.digest}
        state["losses"].append(sum(losses) / len(losses))
        metrics = {"step": state["step"], "loss": state["losses"][-1], "lr": optimizer.param_groups[0]["lr"]}

        validated = bool(val_batches) and state["step"] % cfg.run.eval_every == 0
        if validated and _validate(engine, family, val_batches, cfg, state, metrics):
            best = ckpt.gather_lora(engine, family.lora_root(engine.module), cfg.deepspeed.zero_stage)
        metrics.update(latest_val(state))

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
        elif state["step"] % cfg.run.log_every == 0 or validated:  # every validation reaches Tune (ASHA rungs)
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


def latest_val(state: dict[str, Any]) -> dict[str, float | int]:
    """The latest validation loss and the step it was measured at, to carry in every report.

    Args:
        state: the run state (`checkpoint.new_state`): `val` holds [step, val_loss] pairs of the
            `run.eval_every` passes, `val_base` the loss at step 0 (before any update).

    Returns:
        {"val_loss": nats, "val_step": step} of the latest pass ({} when the run does not validate).
        Every trial of a search validates at step 0 and at the same multiples of `eval_every`, so
        the values sit on the same step scale in every trial.
    """
    if state.get("val"):
        step, val = state["val"][-1]
        return {"val_loss": val, "val_step": step}
    if state.get("val_base") is not None:
        return {"val_loss": state["val_base"], "val_step": 0}
    return {}


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


def _all_ids(ids: torch.Tensor, world: int, device: torch.device) -> list[int]:
    """The global sample ids of one micro-step on all ranks, in rank order (all-gather of int64 [batch_size]
    on `device`, the process group's: nccl gathers CUDA tensors only)."""
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return ids.tolist()
    ids = ids.to(device)
    parts = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(parts, ids)
    return torch.cat(parts).tolist()


def _report_with_checkpoint(engine, cfg: TrainConfig, family, rank: int, state: dict, metrics: dict, best) -> None:
    import ray.train
    from ray.train import Checkpoint

    root = family.lora_root(engine.module)
    tensors = ckpt.gather_lora(engine, root, cfg.deepspeed.zero_stage)  # collective: every rank takes part
    opt_tensors, opt_step = ckpt.gather_optimizer(engine)  # collective too
    if rank != 0:
        ray.train.report(metrics)
        return
    state["optimizer"] = {"step": opt_step}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt.write_checkpoint(tmp, root, tensors, best, state, opt_tensors)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
