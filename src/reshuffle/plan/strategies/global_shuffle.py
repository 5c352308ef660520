"""``global``: a fresh random partition of the whole dataset every epoch (DistributedSampler).

Epoch ``e`` lays a keyed random permutation of ``[0, N)`` over the balanced rank blocks, so a
rank computes its share in O(N/M) and the owner of any id in O(1) (the permutation's inverse).
It ignores the initial partition: epoch 0 is as random as every other. In store mode about
(M-1)/M of a rank's samples move every epoch, which is the cost the other strategies avoid.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from reshuffle.plan import streams
from reshuffle.plan.layout import Layout, group_by_rank
from reshuffle.plan.permutation import KeyedPermutation
from reshuffle.plan.strategies.base import Strategy


class GlobalStrategy(Strategy):
    name = "global"

    def _permutation(self, epoch: int) -> KeyedPermutation:
        return KeyedPermutation(
            self.layout.num_samples, streams.key(self.context.seed, streams.Stream.GLOBAL, epoch)
        )

    def slots(self, epoch: int, rank: int) -> NDArray[np.int64]:
        start, stop = self.layout.offsets[rank], self.layout.offsets[rank + 1]
        return self._permutation(epoch).forward(np.arange(start, stop, dtype=np.int64))

    def locate(self, epoch: int, ids: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        positions = self._permutation(epoch).inverse(ids)
        ranks = self.layout.rank_of(positions)
        return ranks, positions - self.layout.offsets[ranks]

    def owners(self, epoch: int, ids: NDArray[np.int64]) -> NDArray[np.int64]:
        """The rank holding each of ``ids`` in ``epoch`` (pointwise, O(len(ids)))."""
        return self.layout.rank_of(self._permutation(epoch).inverse(ids))

    def sends(self, epoch: int, rank: int) -> dict[int, NDArray[np.int64]]:
        ids = self.held(epoch, rank)
        return group_by_rank(ids, self.owners(epoch + 1, ids), exclude=rank)

    def receives(self, epoch: int, rank: int) -> dict[int, NDArray[np.int64]]:
        ids = self.held(epoch + 1, rank)
        return group_by_rank(ids, self.owners(epoch, ids), exclude=rank)

    @classmethod
    def expected_churn(cls, layout: Layout, fraction: float) -> float:
        return (layout.world_size - 1) / layout.world_size

    @classmethod
    def expected_coverage(cls, layout: Layout, fraction: float, epochs: int) -> float:
        return 1.0 - (1.0 - 1.0 / layout.world_size) ** epochs
