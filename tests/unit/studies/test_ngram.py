"""Count-based code references of the adaptation study."""

import math

import numpy as np
import pytest

from musiclora.studies.ngram import code_model_loss


def _sample(codes, num_frames=None):
    codes = np.asarray(codes, dtype=np.int16)
    return {"codes.npy": codes, "json": {"num_frames": codes.shape[-1] if num_frames is None else num_frames}}


def test_counts_by_hand():
    train = [_sample([[0, 0, 1, 1]])]
    held = [_sample([[1, 1, 0]], num_frames=2), _sample([[0, 1, 0]], num_frames=1)]  # frames past num_frames ignored
    # order 0: counts [2.5, 2.5] -> ln 2 for each of the 3 valid frames
    assert code_model_loss(train, held, entries=2, order=0) == pytest.approx(math.log(2))
    # order 1: rows 0: [1.5, 1.5], 1: [0.5, 1.5]; frames: first 1 (ln 2), 1 -> 1 (ln 4/3), first 0 (ln 2)
    expect = (2 * math.log(2) + math.log(4 / 3)) / 3
    assert code_model_loss(train, held, entries=2, order=1) == pytest.approx(expect)


def test_previous_frame_model_sees_held_notes_the_frequencies_do_not():
    rng = np.random.default_rng(0)

    def notes(n):
        return [_sample(np.repeat(rng.integers(0, 64, (4, 20)), 5, axis=1)) for _ in range(n)]

    train, held = notes(200), notes(20)
    uni, big = (code_model_loss(train, held, 64, order) for order in (0, 1))
    assert uni == pytest.approx(math.log(64), abs=0.05)
    assert big < uni - 2.0  # a note is held 4 frames out of 5


def test_bad_arguments_are_named():
    s = [_sample([[0, 1]])]
    with pytest.raises(ValueError, match="order"):
        code_model_loss(s, s, 2, order=2)
    with pytest.raises(ValueError, match="smoothing"):
        code_model_loss(s, s, 2, order=0, smoothing=0)
    with pytest.raises(ValueError, match=r"heldout: codes must lie in \[0, 2\)"):
        code_model_loss(s, [_sample([[0, 5]])], 2, order=0)
    with pytest.raises(ValueError, match="no valid frame"):
        code_model_loss(s, [_sample([[0, 1]], num_frames=0)], 2, order=0)
