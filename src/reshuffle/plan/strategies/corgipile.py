"""``corgipile``: storage-aware shuffling for data that is read sequentially (CorgiPile, SIGMOD 2022).

Every rank keeps its partition, as ``local`` does, but its training order is not a random
permutation of single samples, which would read a random sample of a shard each step. Instead the
rank's samples are cut into *blocks* (runs of ``block_size`` consecutive ids: a run of a shard,
since reshuffle's shard sources number samples shard by shard), the blocks are shuffled, and the
samples of each group of ``buffer_blocks`` consecutive blocks in that order are shuffled among
themselves (the tuple-level shuffle in a buffer). A rank then reads ``buffer_blocks`` blocks
sequentially, trains on them in a random order, and moves on: nearly the I/O of a sequential
scan, with randomness at two levels. Both shuffles are drawn from (seed, epoch, rank), so the
order is deterministic like every plan's. With a ``contiguous`` partition a rank's blocks are
whole runs of the dataset; with ``random`` ones they are scattered and the order is close to
``local``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from reshuffle.plan import streams
from reshuffle.plan.strategies.local import LocalStrategy


class CorgiPileStrategy(LocalStrategy):
    name = "corgipile"
    option_defaults: ClassVar[Mapping[str, Any]] = {"block_size": 256, "buffer_blocks": 8}

    def order(self, epoch: int, rank: int, held: NDArray[np.int64]) -> NDArray[np.int64]:
        block_size, buffer = (
            int(self.context.options["block_size"]),
            int(self.context.options["buffer_blocks"]),
        )
        if block_size < 1 or buffer < 1:
            raise ValueError(f"corgipile needs block_size and buffer_blocks >= 1, got {block_size}, {buffer}")
        ids = np.sort(held)
        blocks = np.split(ids, np.flatnonzero(np.diff(ids // block_size)) + 1) if ids.size else []
        rng = streams.rng(self.context.seed, streams.Stream.ORDER, epoch, rank)
        shuffled = [blocks[b] for b in rng.permutation(len(blocks))]
        out = [
            rng.permutation(np.concatenate(shuffled[first : first + buffer]))
            for first in range(0, len(shuffled), buffer)
        ]
        return np.concatenate(out) if out else ids
