"""Validation loss on held-out shards, the same value on every rank."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from musiclora.data.shards import ShardStream
from musiclora.train.device import batch_to_device


def load_val_batches(urls: list[str], rank: int, world: int, batch_size: int, collate, max_batches: int,
                     device: torch.device | str = "cpu") -> list:
    """This rank's validation batches, materialised once (the held-out set is small).

    Every rank keeps the same number of batches (the minimum over ranks, all-reduced on `device`:
    NCCL reduces CUDA tensors only), so the forward passes line up under ZeRO-3, whose forward is
    collective. The batches stay on the CPU; `validation_loss` moves each to the engine's device.
    """
    stream = ShardStream(urls, rank=rank, world_size=world, seed=0, shuffle_buffer=0)
    loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, collate_fn=collate, drop_last=True)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) >= max_batches:
            break
    n = torch.tensor([len(batches)], dtype=torch.long, device=device)
    if dist.is_initialized():
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
    return batches[: int(n.item())]


@torch.no_grad()
def validation_loss(engine, family, batches: list[dict[str, Any]]) -> float:
    """Mean loss over `batches` on every rank, averaged over ranks (all-reduce).

    Each batch is moved to the engine's device and the sums are reduced there (NCCL reduces CUDA
    tensors only); `engine` is a DeepSpeed engine or any module with a `device` attribute.
    """
    device = getattr(engine, "device", None) or next(engine.parameters()).device
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        total[0] += family.loss(engine, batch_to_device(batch, device)).detach().double()
        total[1] += 1
    engine.train()
    if dist.is_initialized():
        dist.all_reduce(total)
    return float(total[0] / total[1]) if total[1] else float("nan")
