"""Per-sample importance from observed losses, and the pure steps that turn it into partitions.

Used by the ``importance`` strategy (DAIS 2023: partition by importance instead of at random) and
by ``partial`` with ``select="importance"`` (send hard samples more often). Everything here is
numpy and deterministic: the same losses give the same arrays in every process.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from reshuffle.plan.layout import Layout

MEASURES = ("mean", "variance")
ASSIGNMENTS = ("stripes", "blocks")


class LossWindow:
    """Running per-sample sums of the losses observed over some epochs: O(N) float64 x 3.

    Each sample has at most one (already rank-reduced) loss per epoch, so ``count`` is the number
    of epochs the sample was seen in.
    """

    def __init__(self, num_samples: int) -> None:
        self.total = np.zeros(num_samples, dtype=np.float64)
        self.squares = np.zeros(num_samples, dtype=np.float64)
        self.count = np.zeros(num_samples, dtype=np.float64)
        self.epochs: list[int] = []

    def add(self, epoch: int, ids: NDArray[np.int64], losses: NDArray[np.floating]) -> None:
        """Add one epoch's per-sample losses (``ids`` unique)."""
        values = np.asarray(losses, dtype=np.float64)
        if ids.shape != values.shape:
            raise ValueError(f"ids and losses differ in shape: {ids.shape} vs {values.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.total.size):
            raise ValueError(f"sample ids must be in [0, {self.total.size}), got {ids.min()}..{ids.max()}")
        if not np.all(np.isfinite(values)):
            raise ValueError(f"epoch {epoch}: {int(np.sum(~np.isfinite(values)))} losses are not finite")
        self.total[ids] += values
        self.squares[ids] += values * values
        self.count[ids] += 1
        self.epochs.append(int(epoch))

    def importance(self, measure: str) -> NDArray[np.float64]:
        """Per-sample importance: mean loss, or the unbiased variance of a sample's losses over
        epochs. Samples never seen get the mean importance of those seen (0 if none were)."""
        if measure not in MEASURES:
            raise ValueError(f"unknown importance measure {measure!r}; choose one of {', '.join(MEASURES)}")
        seen = self.count > 0
        scores = np.zeros(self.total.size, dtype=np.float64)
        if measure == "mean":
            scores[seen] = self.total[seen] / self.count[seen]
        else:
            twice = self.count > 1
            n = self.count[twice]
            scores[twice] = np.maximum(0.0, (self.squares[twice] - self.total[twice] ** 2 / n) / (n - 1))
            seen = twice
        if seen.any() and not seen.all():
            scores[~seen] = scores[seen].mean()
        return scores

    def state_dict(self) -> dict[str, Any]:
        """Plain data (lists of floats and ints): JSON and ``torch.load(weights_only=True)`` read it."""
        return {
            "total": self.total.tolist(),
            "squares": self.squares.tolist(),
            "count": self.count.tolist(),
            "epochs": list(self.epochs),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name in ("total", "squares", "count"):
            array = np.asarray(state[name], dtype=np.float64)
            if array.shape != self.total.shape:
                raise ValueError(f"loss window {name} has shape {array.shape}, expected {self.total.shape}")
            getattr(self, name)[:] = array
        self.epochs = [int(e) for e in state["epochs"]]


def rank_by_importance(scores: NDArray[np.floating]) -> NDArray[np.int64]:
    """Sample ids sorted by importance, highest first; ties by id (so the order is unique)."""
    ids = np.arange(scores.size, dtype=np.int64)
    return np.lexsort((ids, -np.asarray(scores, dtype=np.float64))).astype(np.int64)


def assign(order: NDArray[np.int64], layout: Layout, assignment: str, rank: int) -> NDArray[np.int64]:
    """The ids ``rank`` holds when ``order`` (most important first) is dealt out.

    ``stripes``: position i goes to rank i mod M, so every rank gets an equal share of each
    importance level; ``blocks``: contiguous runs of the order, rank 0 the most important.
    Both give the balanced sizes of ``layout``.
    """
    if assignment == "stripes":
        return order[rank :: layout.world_size]
    if assignment == "blocks":
        return order[layout.offsets[rank] : layout.offsets[rank + 1]]
    raise ValueError(f"unknown assignment {assignment!r}; choose one of {', '.join(ASSIGNMENTS)}")


def owners(order: NDArray[np.int64], layout: Layout, assignment: str) -> NDArray[np.int64]:
    """Rank of every sample id under :func:`assign` (an N-length array)."""
    positions = np.empty(order.size, dtype=np.int64)
    positions[order] = np.arange(order.size, dtype=np.int64)
    if assignment == "stripes":
        return positions % layout.world_size
    if assignment == "blocks":
        return layout.rank_of(positions)
    raise ValueError(f"unknown assignment {assignment!r}; choose one of {', '.join(ASSIGNMENTS)}")


def weighted_choice(weights: NDArray[np.floating], k: int, rng: np.random.Generator) -> NDArray[np.int64]:
    """Exactly ``k`` distinct positions of ``weights``, drawn without replacement with probability
    proportional to weight (Efraimidis-Spirakis keys: the k largest ``log(u) / w``), sorted.

    Weights are floored at a millionth of their mean so every position stays possible and k is
    always reachable; equal weights give a uniform k-subset.
    """
    w = np.asarray(weights, dtype=np.float64)
    if not 0 <= k <= w.size:
        raise ValueError(f"cannot choose {k} of {w.size} positions")
    if k == 0:
        return np.empty(0, dtype=np.int64)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("importance weights must be finite and non-negative")
    mean = w.mean()
    w = np.maximum(w, 1e-6 * mean if mean > 0 else 1.0)
    keys = np.log(rng.random(w.size)) / w
    chosen = np.argpartition(-keys, k - 1)[:k]
    return np.sort(chosen).astype(np.int64)
