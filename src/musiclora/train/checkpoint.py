"""Training checkpoints: safetensors + JSON only, nothing pickled.

A checkpoint folder holds the peft adapter (`adapter_config.json`, `adapter_model.safetensors`),
the best-by-validation adapter tensors (`best/adapter_model.safetensors`, when validation runs)
and `state.json` (step, samples, losses, validation history, early-stopping counters).
AdamW's moments are not kept: a resumed run restarts them (bias correction makes the first
steps after a restart behave like the first steps of a run). DeepSpeed's `safe_get_full_optimizer_state`
returned no fragment for a client optimizer under ZeRO-2 on CPU here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

STATE = "state.json"
BEST = "best"


def new_state() -> dict[str, Any]:
    """The state of a run that has not taken a step."""
    return {"step": 0, "samples": 0, "losses": [], "val": [], "best": None, "bad_evals": 0, "stopped_early": False}


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


def write_checkpoint(folder: str, root, tensors, best_tensors, state) -> None:
    """Write the checkpoint folder (rank 0)."""
    from safetensors.torch import save_file

    root.save_pretrained(folder, state_dict=tensors, safe_serialization=True)
    if best_tensors is not None:
        Path(folder, BEST).mkdir(exist_ok=True)
        save_file(best_tensors, str(Path(folder, BEST, "adapter_model.safetensors")))
    Path(folder, STATE).write_text(json.dumps(state))


def read_checkpoint(folder: str) -> tuple[dict, dict | None, dict]:
    """(adapter tensors, best tensors or None, state) of a checkpoint folder."""
    from safetensors.torch import load_file

    f = Path(folder)
    tensors = load_file(str(f / "adapter_model.safetensors"))
    best = load_file(str(f / BEST / "adapter_model.safetensors")) if (f / BEST).exists() else None
    state = {**new_state(), **json.loads((f / STATE).read_text())}  # keys added since that checkpoint
    return tensors, best, state
