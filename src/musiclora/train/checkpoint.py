"""Training checkpoints: everything needed to continue identically, as safetensors + JSON only.

A checkpoint folder (written by rank 0; every tensor gathered to full size first, so a run can
resume with another number of workers) holds:

- the peft adapter (`adapter_config.json`, `adapter_model.safetensors`);
- `optimizer.safetensors`: per trainable parameter (peft-free module names) its fp32 master
  weight (`<name>::fp32`) and AdamW moments (`<name>::exp_avg`, `<name>::exp_avg_sq`), read
  through DeepSpeed's `safe_get_full_fp32_param` / `safe_get_full_optimizer_state` (ZeRO-2 and
  ZeRO-3 alike; collective, every rank takes part);
- the best-by-validation adapter tensors (`best/adapter_model.safetensors`, when validation runs);
- `state.json`: `format` (FORMAT), step (which is also the LR schedule position: the LR is a pure
  function of it, `schedule.lr_at`), samples (the data stream position; `data` splits it into
  epoch and samples consumed and names the shards it refers to), AdamW's step count, losses,
  validation history, early-stopping counters, and `consumed`: the global sample ids of every
  step, in order.

RNG: the loop reseeds torch's generator at every step from (seed, step, rank)
(`step_seed`), so no generator state has to be kept: a resumed step draws what the
uninterrupted step drew.

Older checkpoints (no `format`, FORMAT 1): documented migration in `read_checkpoint`, the missing
keys take their defaults, AdamW's moments restart from zero and the data position is taken from
`samples`; a checkpoint from a newer version is refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

STATE = "state.json"
BEST = "best"
OPTIMIZER = "optimizer.safetensors"
FORMAT = 2
_MOMENTS = ("exp_avg", "exp_avg_sq")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the folder and what is wrong."""


def new_state() -> dict[str, Any]:
    """The state of a run that has not taken a step."""
    return {"format": FORMAT, "step": 0, "samples": 0, "losses": [], "val": [], "val_base": None, "best": None,
            "bad_evals": 0, "stopped_early": False, "data": None, "optimizer": None, "consumed": []}


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of optimizer step `step` on `rank`: a pure function, so resumed steps draw the same numbers."""
    return (seed * 1_000_003 + step) * 1_009 + rank


def gather_lora(engine, root, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full float32 adapter tensors (peft names) on every rank; collective under ZeRO-3.

    Under ZeRO-3 each rank holds an empty partition (`torch.Size([0])`) until gathered: saving
    without this gives an empty adapter, a known trap.
    """
    import deepspeed

    from musiclora.adapters import lora_state_dict

    if zero_stage == 3:
        lora = [p for n, p in root.named_parameters() if "lora_" in n]
        with deepspeed.zero.GatheredParameters(lora, modifier_rank=None):
            return {k: v.float().clone() for k, v in lora_state_dict(root).items()}
    return {k: v.float().clone() for k, v in lora_state_dict(root).items()}


def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _base_optimizer(engine):
    """The torch optimizer inside DeepSpeed's ZeRO optimizer (holds the flat fp32 partitions)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _flat_params(engine) -> list[torch.Tensor]:
    """The fp32 partitions the torch optimizer steps (ZeRO-3 swaps them into its param groups only during a step)."""
    flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    return list(flat) if flat is not None else [p for g in _base_optimizer(engine).param_groups for p in g["params"]]


def gather_optimizer(engine) -> tuple[dict[str, torch.Tensor], float]:
    """Full fp32 master weights and AdamW moments of every trainable parameter, and AdamW's step.

    Collective (all-reduce under ZeRO-2, all-gather under ZeRO-3): every rank must call it.

    Returns:
        ({"<name>::fp32" | "<name>::exp_avg" | "<name>::exp_avg_sq": float32 tensor shaped like the
        parameter}, step count). Moments are zeros before the first step.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    base = _base_optimizer(engine)
    started = any(base.state.get(p) for p in _flat_params(engine))
    out = {}
    for name, p in _trainable(engine):
        out[f"{name}::fp32"] = safe_get_full_fp32_param(p).detach().float().cpu().clone()
        for key in _MOMENTS:
            value = safe_get_full_optimizer_state(p, key) if started else None
            out[f"{name}::{key}"] = value.detach().float().cpu().clone() if value is not None else torch.zeros(
                out[f"{name}::fp32"].shape)
    step = next((float(base.state[p]["step"]) for p in _flat_params(engine) if base.state.get(p)), 0.0)
    return out, step


def restore_optimizer(engine, tensors: dict[str, torch.Tensor], step: float) -> None:
    """Load `gather_optimizer`'s output into a freshly initialised DeepSpeed engine (every rank).

    AdamW's state is created lazily at the first step, so it is created here first (zeros, the
    saved step) and DeepSpeed's fragment links refreshed, then every rank copies its partition.

    Raises:
        CheckpointError: a trainable parameter missing from `tensors` (another adapter config).
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    base = _base_optimizer(engine)
    for p in _flat_params(engine):
        if not base.state.get(p):
            base.state[p] = {"step": torch.tensor(step), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        else:
            base.state[p]["step"] = torch.tensor(step)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2: point each parameter's fragment at the new state
        engine.optimizer._hp_optimizer_states_linked = False
        link()
    trainable = _trainable(engine)
    for name, p in trainable:
        if f"{name}::fp32" not in tensors:
            raise CheckpointError(f"{OPTIMIZER} has no state for parameter {name!r}: the checkpoint was written "
                                  "for another adapter configuration")
        safe_set_full_fp32_param(p, tensors[f"{name}::fp32"].to(p.device))
        for key in _MOMENTS:
            safe_set_full_optimizer_state(p, tensors[f"{name}::{key}"].to(p.device), key)
    _set_model_weights(trainable, tensors)


def _set_model_weights(trainable: list, tensors: dict[str, torch.Tensor]) -> None:
    """Copy the fp32 masters into the module's (possibly bf16, possibly ZeRO-3-partitioned) weights."""
    import deepspeed

    params = [p for _, p in trainable]
    partitioned = any(hasattr(p, "ds_id") for p in params)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=partitioned), torch.no_grad():
        for name, p in trainable:
            p.data.copy_(tensors[f"{name}::fp32"].to(p.device, p.dtype).reshape(p.shape))


def write_checkpoint(folder: str, root, tensors, best_tensors, state, optimizer: dict | None = None) -> None:
    """Write the checkpoint folder (rank 0); `optimizer` is `gather_optimizer`'s tensors."""
    from safetensors.torch import save_file

    root.save_pretrained(folder, state_dict=tensors, safe_serialization=True)
    if best_tensors is not None:
        Path(folder, BEST).mkdir(exist_ok=True)
        save_file(best_tensors, str(Path(folder, BEST, "adapter_model.safetensors")))
    if optimizer is not None:
        save_file({k: v.contiguous() for k, v in optimizer.items()}, str(Path(folder, OPTIMIZER)))
    Path(folder, STATE).write_text(json.dumps({**state, "format": FORMAT}))


def read_checkpoint(folder: str) -> tuple[dict, dict | None, dict, dict | None]:
    """(adapter tensors, best tensors or None, state, optimizer tensors or None) of a checkpoint folder.

    Migration: a `state.json` without `format` (written before FORMAT 2) gets the defaults of
    `new_state` for its missing keys and no optimizer tensors (AdamW restarts from zero), with a
    warning.

    Raises:
        CheckpointError: no state.json or adapter, unreadable JSON, or a `format` newer than FORMAT.
    """
    from safetensors.torch import load_file

    f = Path(folder)
    for name in (STATE, "adapter_model.safetensors"):
        if not (f / name).exists():
            raise CheckpointError(f"checkpoint {folder}: no {name}; expected a musiclora training checkpoint")
    try:
        saved = json.loads((f / STATE).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {folder}: {STATE} is not JSON ({exc})") from None
    version = saved.get("format", 1)
    if not isinstance(version, int) or version > FORMAT:
        raise CheckpointError(f"checkpoint {folder}: state format {version!r}, this musiclora reads up to {FORMAT}; "
                              "resume it with the version that wrote it")
    if version < FORMAT:
        log.warning("checkpoint %s has state format %s (< %s): resuming with fresh AdamW moments and the data "
                    "position taken from its sample count", folder, version, FORMAT)
    state = {**new_state(), **saved, "format": FORMAT}
    tensors = load_file(str(f / "adapter_model.safetensors"))
    best = load_file(str(f / BEST / "adapter_model.safetensors")) if (f / BEST).exists() else None
    optimizer = load_file(str(f / OPTIMIZER)) if version >= 2 and (f / OPTIMIZER).exists() else None
    return tensors, best, state, optimizer


def check_data_position(state: dict[str, Any], digest: str, shards_url: str) -> None:
    """Refuse a checkpoint whose data position refers to other shards than those at `shards_url`.

    Raises:
        CheckpointError: the shard digests differ (both named).
    """
    data = state.get("data") or {}
    if data.get("shards_digest") and data["shards_digest"] != digest:
        raise CheckpointError(
            f"checkpoint data position (epoch {data.get('epoch')}, {data.get('consumed')} samples consumed) refers "
            f"to shards with manifest digest {data['shards_digest']}, but {shards_url} now has manifest digest "
            f"{digest}: the shards changed; resume with the original shards or start a new run name"
        )
