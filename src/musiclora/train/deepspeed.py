"""The DeepSpeed ZeRO config, built from a `TrainConfig` (one place, no hand-written JSON)."""

from __future__ import annotations

from typing import Any

import torch

from musiclora.config import TrainConfig


def build_ds_config(cfg: TrainConfig) -> dict[str, Any]:
    """DeepSpeed config dict for `deepspeed.initialize(config=...)`.

    ZeRO stage 2 (default) partitions optimizer state and gradients; stage 3 also partitions the
    parameters. `offload_optimizer` keeps optimizer state in CPU memory and steps it there with the
    client `torch.optim.AdamW` from `build_optimizer`: DeepSpeed refuses a client optimizer under
    offload unless `zero_force_ds_cpu_optimizer` is false (documented in the ZeRO config, "Optimizer
    offloading"); its own CPU Adam would need a JIT-compiled extension on every worker. `bf16`
    enables DeepSpeed's bf16 mode (the model must already be cast to bfloat16). Gradient clipping
    and accumulation come from `OptimConfig`. Source: https://www.deepspeed.ai/docs/config-json/.
    """
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage, "overlap_comm": False}
    extra: dict[str, Any] = {}
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.run.use_gpu}
        extra["zero_force_ds_cpu_optimizer"] = False
    if cfg.deepspeed.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_param_persistence_threshold=0)
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "gradient_clipping": cfg.optim.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.deepspeed.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        **extra,
    }


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the parameters that train (LoRA's, or all of them for full fine-tuning).

    Raises:
        ValueError: no parameter requires a gradient (LoRA matched nothing or everything is frozen).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check adapter.preset / adapter.target_modules")
    return torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)


def model_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype the model is cast to before `deepspeed.initialize`."""
    return torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float32
