"""Count-based code models: the floor a language model must get below to have learned more than counts.

A language model over codec tokens that only learns which codes a style uses scores about the
held-out cross-entropy of the code frequencies (order 0); one that also follows the previous frame
of each codebook scores about a per-level bigram's (order 1). The adaptation study prints both
next to its base LM, so "the base learned the music" is a measured statement, not a reading of
one number against ln(vocabulary).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _codes_and_valid(samples: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """int64 codes [N, K, T] and bool valid frames [N, T] of decoded shard samples (`codes.npy`, `json.num_frames`)."""
    codes = np.stack([s["codes.npy"] for s in samples]).astype(np.int64)
    t = codes.shape[-1]
    frames = np.array([min(int(s["json"].get("num_frames", t)), t) for s in samples])
    return codes, np.arange(t)[None, :] < frames[:, None]


def code_model_loss(
    train: list[dict[str, Any]], heldout: list[dict[str, Any]], entries: int, order: int, smoothing: float = 0.5
) -> float:
    """Held-out cross-entropy of a per-codebook count model fitted on `train`.

    Each codebook level gets its own model: `order` 0 is the code frequencies, `order` 1 the
    distribution of a code given the same level's previous frame (bigram). Counts get additive
    (Lidstone) smoothing `smoothing` (0.5: Jeffreys-Perks), so unseen codes cost a finite amount.
    Only valid frames count (a bigram needs both frames valid); the first frame of a clip is scored
    by the order-0 model.

    Args:
        train / heldout: decoded samples with `codes.npy` int [K, T] and `json["num_frames"]`.
        entries: codes per level (the codec's codebook size); codes must lie in [0, entries).
        order: 0 or 1.
        smoothing: added to every count, > 0.

    Returns:
        Cross-entropy in nats per code, mean over the K levels (the LM loss's averaging).

    Raises:
        ValueError: `order` not 0 or 1, `smoothing` <= 0, a code outside [0, entries), or no
            valid held-out frame.
    """
    if order not in (0, 1):
        raise ValueError(f"order: expected 0 or 1, got {order}")
    if smoothing <= 0:
        raise ValueError(f"smoothing: expected > 0, got {smoothing}")
    (tc, tv), (hc, hv) = _codes_and_valid(train), _codes_and_valid(heldout)
    for name, c in (("train", tc), ("heldout", hc)):
        if c.size and (c.min() < 0 or c.max() >= entries):
            raise ValueError(f"{name}: codes must lie in [0, {entries}), got [{c.min()}, {c.max()}]")
    if not hv.any():
        raise ValueError("heldout: no valid frame")
    levels = []
    for k in range(tc.shape[1]):
        uni = np.bincount(tc[:, k][tv], minlength=entries) + smoothing
        log_uni = np.log(uni / uni.sum())
        first = hc[:, k, 0][hv[:, 0]]
        nll = [-log_uni[first]] if order == 1 else [-log_uni[hc[:, k][hv]]]
        if order == 1:
            pair = tv[:, 1:] & tv[:, :-1]
            counts = np.full((entries, entries), smoothing)
            np.add.at(counts, (tc[:, k, :-1][pair], tc[:, k, 1:][pair]), 1.0)
            log_big = np.log(counts / counts.sum(axis=1, keepdims=True))
            hpair = hv[:, 1:] & hv[:, :-1]
            nll.append(-log_big[hc[:, k, :-1][hpair], hc[:, k, 1:][hpair]])
        levels.append(float(np.concatenate(nll).mean()))
    return float(np.mean(levels))
