"""Validation loss on held-out shards, the same value on every rank."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from musiclora.data.shards import ShardStream


def load_val_batches(urls: list[str], rank: int, world: int, batch_size: int, collate, max_batches: int) -> list:
    """This rank's validation batches, materialised once (the held-out set is small).

    Every rank keeps the same number of batches (the minimum over ranks, all-reduced), so the
    forward passes line up under ZeRO-3, whose forward is collective.
    """
    stream = ShardStream(urls, rank=rank, world_size=world, seed=0, shuffle_buffer=0)
    loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, collate_fn=collate, drop_last=True)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) >= max_batches:
            break
    n = torch.tensor([len(batches)], dtype=torch.long)
    if dist.is_initialized():
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
    return batches[: int(n.item())]


@torch.no_grad()
def validation_loss(engine, family, batches: list[dict[str, Any]]) -> float:
    """Mean loss over `batches` on every rank, averaged over ranks (all-reduce)."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        total[0] += float(family.loss(engine, batch))
        total[1] += 1
    engine.train()
    if dist.is_initialized():
        dist.all_reduce(total)
    return float(total[0] / total[1]) if total[1] else float("nan")
