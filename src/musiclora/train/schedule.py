"""Learning-rate schedule: linear warm-up, then cosine decay to zero (research/001's cosine annealing)."""

from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based).

    lr = base * (step + 1) / warmup during warm-up, then base * 0.5 * (1 + cos(pi * progress)) with
    progress = (step - warmup) / (max_steps - warmup) (Loshchilov & Hutter, SGDR, 2017).
    """
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
