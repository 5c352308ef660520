"""``local``: every rank keeps its initial partition forever and only reshuffles its order.

No data moves, so storage is N/M per rank and there is no exchange to hide; the price is that a
rank sees only its own partition, which hurts when partitions are not IID (see ``label-sorted``).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from reshuffle.plan.layout import Layout
from reshuffle.plan.strategies.base import Strategy


class LocalStrategy(Strategy):
    name = "local"

    def slots(self, epoch: int, rank: int) -> NDArray[np.int64]:
        return self.context.partition.rank_ids(rank)

    def locate(self, epoch: int, ids: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        return self.context.partition.locate(ids)

    def sends(self, epoch: int, rank: int) -> dict[int, NDArray[np.int64]]:
        return {}

    def receives(self, epoch: int, rank: int) -> dict[int, NDArray[np.int64]]:
        return {}

    @classmethod
    def expected_churn(cls, layout: Layout, fraction: float) -> float:
        return 0.0

    @classmethod
    def expected_coverage(cls, layout: Layout, fraction: float, epochs: int) -> float:
        return 1.0 / layout.world_size
