"""``partial``: between epochs every rank sends exactly k = round(Q * floor(N/M)) of its samples to
other ranks and receives k, as in "Why Globally Re-shuffle?" (IPDPS 2022).

How the moves are laid out, so that a rank plans its own share in O(N/M) time and memory:

* the slots ``0 .. floor(N/M) - 1`` exist on every rank; call slot ``p`` of all ranks *column* p;
* between epochs ``t`` and ``t + 1`` a uniform random set of k columns moves (the same set on every
  rank, drawn from ``(seed, t)``); each moving column ``p`` gets a shift ``s_p`` drawn uniformly
  from ``1 .. M-1``, and the sample in slot ``p`` of rank ``r`` goes to slot ``p`` of rank
  ``(r + s_p) mod M``;
* so every rank sends exactly k and receives exactly k, never to itself, sizes stay balanced, and
  after ``e`` epochs slot ``p`` of rank ``r`` holds the sample that started in slot ``p`` of rank
  ``(r - S_e[p]) mod M``, where ``S_e`` is the running sum of column ``p``'s shifts.

Per rank the draws match "shuffle locally, send the first k to random other ranks": the k that
leave are a uniform random k-subset of the rank's first floor(N/M) slots, and each goes to (and
each arrival comes from) a uniformly random other rank. Two consequences of the column layout:
the extra slot that the first ``N % M`` ranks hold never moves, and two samples that start in the
same column on different ranks never share a rank (1 in N/M of all pairs; no effect on label
mixing or churn). ``Q = 0`` is exactly ``local``.

``S_e`` costs O(k) per epoch to advance and is cached, so consecutive epochs cost O(N/M) each; a
cold start at epoch ``e`` replays ``e`` epochs of k draws each.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from reshuffle.plan import streams
from reshuffle.plan.layout import Layout, group_by_rank
from reshuffle.plan.strategies.base import PlanContext, Strategy


def moves_per_epoch(layout: Layout, fraction: float) -> int:
    """k = round(Q * floor(N/M)) for M >= 2; 0 on a single rank (there is nowhere to send)."""
    return round(fraction * layout.min_size) if layout.world_size > 1 else 0


class PartialStrategy(Strategy):
    name = "partial"
    uses_fraction = True

    def __init__(self, context: PlanContext) -> None:
        super().__init__(context)
        self.k = moves_per_epoch(self.layout, context.fraction)
        self._shift_epoch = 0
        self._shift = np.zeros(self.layout.min_size, dtype=np.int64)

    def moves(self, epoch: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """The columns that move between ``epoch`` and ``epoch + 1`` and their rank shifts."""
        rng = streams.rng(self.context.seed, streams.Stream.PARTIAL, epoch)
        columns = rng.choice(self.layout.min_size, size=self.k, replace=False)
        shifts = rng.integers(1, self.layout.world_size, size=self.k)
        return columns.astype(np.int64), shifts.astype(np.int64)

    def column_shift(self, epoch: int) -> NDArray[np.int64]:
        """``S_epoch``: how many ranks forward each column has moved since epoch 0 (mod M)."""
        if epoch < self._shift_epoch:
            self._shift_epoch, self._shift = 0, np.zeros_like(self._shift)
        shift = self._shift.copy()
        for t in range(self._shift_epoch, epoch):
            columns, shifts = self.moves(t)
            shift[columns] = (shift[columns] + shifts) % self.layout.world_size
        self._shift_epoch, self._shift = epoch, shift
        return shift

    def _held(self, epoch: int, ranks: NDArray[np.int64], columns: NDArray[np.int64]) -> NDArray[np.int64]:
        """Id in column ``columns[i]`` of rank ``ranks[i]`` at ``epoch``."""
        origin = (ranks - self.column_shift(epoch)[columns]) % self.layout.world_size
        return self.context.partition.lookup(origin, columns)

    def slots(self, epoch: int, rank: int) -> NDArray[np.int64]:
        columns = np.arange(self.layout.min_size, dtype=np.int64)
        ids = self._held(epoch, np.full_like(columns, rank), columns)
        if self.layout.size(rank) > self.layout.min_size:  # the extra slot never moves
            extra = self.context.partition.lookup(np.array([rank]), np.array([self.layout.min_size]))
            ids = np.concatenate([ids, extra])
        return ids

    def sends(self, epoch: int, rank: int) -> dict[int, NDArray[np.int64]]:
        columns, shifts = self.moves(epoch)
        ids = self._held(epoch, np.full_like(columns, rank), columns)
        return group_by_rank(ids, (rank + shifts) % self.layout.world_size)

    def receives(self, epoch: int, rank: int) -> dict[int, NDArray[np.int64]]:
        columns, shifts = self.moves(epoch)
        sources = (rank - shifts) % self.layout.world_size
        return group_by_rank(self._held(epoch, sources, columns), sources)

    @classmethod
    def expected_churn(cls, layout: Layout, fraction: float) -> float:
        # k of n_r slots are new on every rank; averaged over the ceil- and floor-sized ranks.
        sizes = np.diff(layout.offsets)
        return float(np.mean(moves_per_epoch(layout, fraction) / sizes))
