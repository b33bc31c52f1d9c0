"""Validation loss on held-out shards: a fixed function of the adapter, the same value on every rank.

- The held-out set is fixed: the first M = min(N_val, max_batches * batch_size * world) samples
  of the `val` split in manifest order.
- Ranks take contiguous runs of ceil(M / world) of them; the positions past M are filled with
  repeats flagged as pads (so every rank runs the same number of forward passes, which ZeRO-3's
  collective forward needs) and the pads carry weight 0: the loss is the mean over the M real
  samples, each batch's loss weighted by its real samples.
- Every batch carries `noise_seeds` (int64 [B]): a seed per sample derived from its key, so a
  family that draws noise (diffusion timesteps and noise) draws the same numbers for the same
  sample at every evaluation.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
import torch.distributed as dist

from musiclora.data.indexed import ShardIndex
from musiclora.train.device import batch_to_device


def key_seed(key: str) -> int:
    """A 63-bit seed from a sample key (sha256), the same in every process and run."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:15], 16)


def val_plan(num_samples: int, rank: int, world: int, batch_size: int, max_batches: int) -> list[list[tuple[int, bool]]]:
    """This rank's validation batches as lists of (sample id, is_pad).

    Every rank gets ceil(ceil(M / world) / batch_size) batches (see the module docstring).
    """
    m = min(num_samples, max_batches * batch_size * world)
    n = math.ceil(m / world)
    slots = [(p % m, p >= m) for p in range(rank * n, rank * n + n)]
    return [slots[i : i + batch_size] for i in range(0, n, batch_size)]


def load_val_batches(index: ShardIndex, rank: int, world: int, batch_size: int, collate, max_batches: int) -> list:
    """This rank's validation batches, materialised once (the held-out set is small).

    Returns:
        [{"batch": collate(real samples) with `noise_seeds` added, "weight": number of real samples}];
        an all-pad batch keeps its samples (for the collective forward) with weight 0.
    """
    out = []
    for plan in val_plan(index.num_samples, rank, world, batch_size, max_batches):
        samples = index.read([i for i, _ in plan])
        real = [s for s, (_, pad) in zip(samples, plan, strict=True) if not pad]
        used = real or samples
        batch = collate(used)
        batch["noise_seeds"] = torch.tensor([key_seed(s["__key__"]) for s in used], dtype=torch.long)
        out.append({"batch": batch, "weight": len(real)})
    return out


@torch.no_grad()
def validation_loss(engine, family, batches: list[dict[str, Any]]) -> float:
    """Mean loss over the real validation samples of all ranks (all-reduce); pads weigh nothing.

    Each batch is moved to the engine's device and the sums are reduced there (NCCL reduces CUDA
    tensors only); `engine` is a DeepSpeed engine or any module with a `device` attribute.

    Returns:
        sum(batch loss * real samples) / sum(real samples), NaN when there is none.
    """
    device = getattr(engine, "device", None) or next(engine.parameters()).device
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for item in batches:
        loss = family.loss(engine, batch_to_device(item["batch"], device)).detach().double()
        total[0] += loss * item["weight"]
        total[1] += item["weight"]
    engine.train()
    if dist.is_initialized():
        dist.all_reduce(total)
    return float(total[0] / total[1]) if total[1] else float("nan")
