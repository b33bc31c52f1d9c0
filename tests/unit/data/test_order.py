"""The global sample order: properties over (seed, epoch, world size, position)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from musiclora.data.order import data_position, epoch_permutation, rank_ids, sample_ids


@pytest.mark.parametrize("n,seed,epoch", [(1, 0, 0), (7, 3, 2), (100, 0, 5), (1000, 42, 0)])
def test_each_epoch_is_a_permutation(n, seed, epoch):
    perm = epoch_permutation(n, seed, epoch)
    assert sorted(perm.tolist()) == list(range(n))


def test_order_depends_on_seed_and_epoch_and_is_reproducible():
    a = epoch_permutation(500, 1, 0)
    assert np.array_equal(a, np.random.default_rng([1, 0]).permutation(500))
    assert not np.array_equal(a, epoch_permutation(500, 1, 1))
    assert not np.array_equal(a, epoch_permutation(500, 2, 0))
    assert epoch_permutation(10, 0, 0, shuffle=False).tolist() == list(range(10))


def _run(n, seed, batch_size, segments):
    """Ids consumed by a run whose world size changes: segments = [(world, steps), ...]."""
    position, consumed = 0, []
    for world, steps in segments:
        for step in range(steps):
            for rank in range(world):
                consumed += rank_ids(position, step, batch_size, world, rank, n, seed).tolist()
        position += steps * world * batch_size
    return consumed, position


@pytest.mark.parametrize("n,b", [(37, 2), (64, 4), (10, 3)])
@pytest.mark.parametrize("seed", [0, 9])
def test_resuming_with_other_world_sizes_continues_the_same_stream(n, b, seed):
    """2 -> 1 -> 4 workers consume exactly the stream an uninterrupted run would: no duplicate, no gap."""
    consumed, position = _run(n, seed, b, [(2, 5), (1, 3), (4, 4)])
    assert consumed == sample_ids(0, position, n, seed).tolist()
    for epoch in range(position // n):  # each complete epoch holds every sample exactly once
        assert sorted(consumed[epoch * n : (epoch + 1) * n]) == list(range(n))
    tail = consumed[(position // n) * n :]
    assert len(tail) == len(set(tail))


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 1), (4, 3)])
def test_rank_takes_a_fixed_slice_of_each_global_batch(world, rank):
    n, b, seed = 50, 3, 5
    for position, step in itertools.product([0, 7, 49, 130], [0, 1, 6]):
        start = position + step * world * b + rank * b
        assert rank_ids(position, step, b, world, rank, n, seed).tolist() == sample_ids(start, b, n, seed).tolist()


def test_a_batch_draws_from_many_shards_whatever_the_worker_count():
    """1000 samples in 100 shards of 10: a batch of 16 touches about as many shards as samples."""
    ids = sample_ids(0, 16 * 20, 1000, 0).reshape(20, 16)
    distinct = [len(set((row // 10).tolist())) for row in ids]
    assert min(distinct) >= 12


def test_data_position_and_bad_input():
    assert data_position(25, 10) == {"position": 25, "epoch": 2, "consumed": 5}
    with pytest.raises(ValueError, match="num_samples"):
        epoch_permutation(0, 0, 0)
    with pytest.raises(ValueError, match="rank 2 outside"):
        rank_ids(0, 0, 1, 2, 2, 10, 0)
