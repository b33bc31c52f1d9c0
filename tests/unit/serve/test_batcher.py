"""MixedBatcher: concurrent items share batches of at most max_batch_size, each caller gets its
own slot's result (an exception instance when its item failed), and a failing batch fails only
its own callers."""

from __future__ import annotations

import asyncio

import pytest

from serve.batcher import MixedBatcher


def test_items_share_bounded_batches_and_get_their_own_results():
    seen: list[list[int]] = []

    async def run(items):
        seen.append(list(items))
        if -1 in items:
            raise RuntimeError("batch broke")
        return [ValueError(f"bad {i}") if i == 3 else i * 10 for i in items]

    async def scenario():
        batcher = MixedBatcher(run, max_batch_size=4, batch_wait_timeout_s=30)
        first = await asyncio.gather(*[batcher.submit(i) for i in range(8)])
        broken = await asyncio.gather(*[batcher.submit(i) for i in (-1, 5, 6, 7)])
        return first, broken

    first, broken = asyncio.run(scenario())
    assert [len(b) for b in seen] == [4, 4, 4]  # batches fill to 4 (no waiting on the clock)
    assert [r for i, r in enumerate(first) if i != 3] == [0, 10, 20, 40, 50, 60, 70]
    assert isinstance(first[3], ValueError) and "bad 3" in str(first[3])
    assert all(isinstance(r, RuntimeError) for r in broken)


def test_bad_settings_are_refused():
    async def run(items):
        return items

    with pytest.raises(ValueError, match="max_batch_size"):
        MixedBatcher(run, max_batch_size=0)
