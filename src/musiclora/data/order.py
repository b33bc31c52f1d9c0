"""The global sample order of a training run: a pure function of (seed, epoch, position).

The training stream is the endless concatenation of epochs; epoch e is a seeded permutation
of the manifest's N samples (global sample ids 0..N-1 in manifest order: shard by shard, each
shard's members in file order). A run's data position is one integer, `position`, the samples
consumed by all ranks together; (epoch, consumed) = divmod(position, N).

One step of W ranks with `batch_size` b takes the global batch [position, position + W*b) and
rank r takes the fixed slice [position + r*b, position + (r+1)*b) of it. Nothing depends on the
number of DataLoader workers, and the world size only decides how the next positions are cut,
so a run resumed with another world size continues at the next unseen sample: no sample twice
within an epoch, none skipped. A global batch may straddle two epochs; no pads are needed.

Shuffle quality does not depend on the number of workers: the permutation is over all N
samples (MosaicML Streaming's guarantee), so each batch draws from many shards, unlike a
per-worker shuffle buffer over a few shards.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=4)
def epoch_permutation(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order of epoch `epoch`: a permutation of range(num_samples).

    Args:
        num_samples: N, samples in the manifest's training split (> 0).
        seed: the run's data seed.
        epoch: 0-based epoch.
        shuffle: False keeps manifest order (every epoch the same).

    Returns:
        int64 array [N], read-only; drawn by numpy's PCG64 `default_rng([seed, epoch])`.

    Raises:
        ValueError: num_samples < 1 or a negative epoch.
    """
    if num_samples < 1:
        raise ValueError(f"epoch_permutation: num_samples={num_samples}, expected at least 1")
    if epoch < 0:
        raise ValueError(f"epoch_permutation: epoch={epoch}, expected >= 0")
    perm = np.random.default_rng([seed, epoch]).permutation(num_samples) if shuffle else np.arange(num_samples)
    perm = perm.astype(np.int64)
    perm.flags.writeable = False
    return perm


def sample_ids(start: int, count: int, num_samples: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """Global sample ids at stream positions [start, start + count).

    Returns:
        int64 array [count]; position p is id `epoch_permutation(N, seed, p // N)[p % N]`.

    Raises:
        ValueError: a negative start or count.
    """
    if start < 0 or count < 0:
        raise ValueError(f"sample_ids: start={start}, count={count}; expected both >= 0")
    out, pos, stop = [], start, start + count
    while pos < stop:
        epoch, offset = divmod(pos, num_samples)
        take = min(num_samples - offset, stop - pos)
        out.append(epoch_permutation(num_samples, seed, epoch, shuffle)[offset : offset + take])
        pos += take
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def rank_ids(position: int, step: int, batch_size: int, world_size: int, rank: int, num_samples: int, seed: int,
             shuffle: bool = True) -> np.ndarray:
    """The ids rank `rank` reads for the `step`-th global batch after `position`.

    Global batch k starts at position + k * W * b; rank r takes its slice r*b .. (r+1)*b.

    Returns:
        int64 array [batch_size].

    Raises:
        ValueError: a rank outside [0, world_size) or a batch_size < 1.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank_ids: rank {rank} outside world_size {world_size}")
    if batch_size < 1:
        raise ValueError(f"rank_ids: batch_size={batch_size}, expected >= 1")
    start = position + step * world_size * batch_size + rank * batch_size
    return sample_ids(start, batch_size, num_samples, seed, shuffle)


def data_position(position: int, num_samples: int) -> dict[str, int]:
    """{"position", "epoch", "consumed"}: the stream position split into (epoch, samples consumed in it)."""
    epoch, consumed = divmod(position, num_samples)
    return {"position": position, "epoch": epoch, "consumed": consumed}
