"""The DeepSpeed ZeRO config, built from a `TrainConfig` (one place, no hand-written JSON)."""

from __future__ import annotations

from typing import Any

import torch

from musiclora.config import TrainConfig


def build_ds_config(cfg: TrainConfig) -> dict[str, Any]:
    """DeepSpeed config dict for `deepspeed.initialize(config=...)`.

    ZeRO stage 2 (default) partitions optimizer state and gradients; stage 3 also partitions the
    parameters. `offload_optimizer` keeps optimizer state in CPU memory. `bf16` enables DeepSpeed's
    bf16 mode (the model must already be cast to bfloat16 on CPU). Gradient clipping and
    accumulation come from `OptimConfig`. Source: https://www.deepspeed.ai/docs/config-json/.
    """
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage, "overlap_comm": False}
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
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
    }


def model_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype the model is cast to before `deepspeed.initialize`."""
    return torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float32
