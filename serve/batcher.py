"""One queue of generation requests for any adapters, run in batches on the model thread.

Ray Serve's `@serve.batch` splits every batch by multiplexed model id (ray/serve/batching.py
`_split_batch_by_model_id`), so requests for different adapters never meet in one batch. The model
deployment therefore batches with `MixedBatcher` instead: requests (adapter id, params) from any
adapter wait together, up to `max_batch_size` of them or `batch_wait_timeout_s` after the first,
and the batch runs as one batched generation (`ModelHost.run`). One batch runs at a time, since
one replica has one model thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class MixedBatcher(Generic[Item, Result]):
    """Collects items from concurrent callers into batches for `run_batch`.

    Args:
        run_batch: runs a batch; returns one result (or exception instance) per item, in order.
        max_batch_size: most items per batch, >= 1.
        batch_wait_timeout_s: how long a batch waits to fill after its first item, >= 0.

    Raises:
        ValueError: a batch size below 1 or a negative wait.
    """

    def __init__(self, run_batch: Callable[[list[Item]], Awaitable[list[Result | Exception]]],
                 max_batch_size: int = 4, batch_wait_timeout_s: float = 0.05):
        if max_batch_size < 1 or batch_wait_timeout_s < 0:
            raise ValueError(f"max_batch_size must be >= 1 and batch_wait_timeout_s >= 0, got {max_batch_size} "
                             f"and {batch_wait_timeout_s}")
        self.run_batch, self.max_batch_size, self.batch_wait_timeout_s = run_batch, max_batch_size, batch_wait_timeout_s
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, item: Item) -> Result | Exception:
        """Queue `item` and wait for its result (an exception instance when its request failed)."""
        loop = asyncio.get_running_loop()
        if self._queue is None or self._worker is None or self._worker.done():
            self._queue = self._queue or asyncio.Queue()
            self._worker = loop.create_task(self._loop())
        future = loop.create_future()
        self._queue.put_nowait((item, future))
        return await asyncio.shield(future)  # a cancelled caller leaves its item to run (its hold is released there)

    async def _loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.batch_wait_timeout_s
            while len(batch) < self.max_batch_size:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except TimeoutError:
                    break
            try:
                results = await self.run_batch([item for item, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error
                results = [exc] * len(batch)
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
