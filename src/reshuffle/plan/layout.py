"""How N samples split into M balanced rank partitions, and the arithmetic that follows."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray


@dataclass(frozen=True)
class Layout:
    """Balanced partition sizes: the first ``N % M`` ranks hold ``ceil(N/M)`` samples, the rest
    ``floor(N/M)``. Rank ``r`` owns the *slots* ``0 .. size(r) - 1``; a strategy decides which
    sample sits in which slot in each epoch. O(M) memory.

    Args:
        num_samples: N, the dataset size.
        world_size: M, the number of ranks; ``1 <= M <= N``.
    """

    num_samples: int
    world_size: int
    offsets: NDArray[np.int64] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {self.world_size}")
        if self.num_samples < self.world_size:
            raise ValueError(
                f"num_samples ({self.num_samples}) is smaller than world_size ({self.world_size}): "
                "every rank needs at least one sample; use fewer ranks or a larger dataset"
            )
        base, extra = divmod(self.num_samples, self.world_size)
        sizes = np.full(self.world_size, base, dtype=np.int64)
        sizes[:extra] += 1
        offsets = np.zeros(self.world_size + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        object.__setattr__(self, "offsets", offsets)

    @property
    def min_size(self) -> int:
        """``floor(N / M)``: the slots every rank has."""
        return self.num_samples // self.world_size

    @property
    def max_size(self) -> int:
        """``ceil(N / M)``."""
        return -(-self.num_samples // self.world_size)

    def size(self, rank: int) -> int:
        """Number of samples rank ``rank`` holds."""
        return int(self.offsets[rank + 1] - self.offsets[rank])

    def rank_of(self, positions: ArrayLike) -> NDArray[np.int64]:
        """Rank owning each position of the concatenated order ``0 .. N-1`` (block layout)."""
        return np.searchsorted(self.offsets, np.asarray(positions), side="right").astype(np.int64) - 1

    def check_rank(self, rank: int) -> int:
        """``rank`` as an int, or a ValueError naming the valid range."""
        if not 0 <= int(rank) < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        return int(rank)


def group_by_rank(
    ids: NDArray[np.int64], ranks: NDArray[np.int64], *, exclude: int | None = None
) -> dict[int, NDArray[np.int64]]:
    """``{rank: sorted ids}`` for every rank that appears in ``ranks`` (except ``exclude``).

    Args:
        ids: sample ids, shape (n,).
        ranks: the rank each id goes to or comes from, shape (n,).
        exclude: a rank to leave out (the caller itself).
    """
    if exclude is not None:
        keep = ranks != exclude
        ids, ranks = ids[keep], ranks[keep]
    if ids.size == 0:
        return {}
    # One sort of rank * span + id orders by rank, then id (faster than a two-key lexsort).
    span = int(ids.max()) + 1
    keys = np.sort(ranks.astype(np.int64) * span + ids)
    ranks, ids = np.divmod(keys, span)
    starts = np.flatnonzero(np.r_[True, ranks[1:] != ranks[:-1]])
    bounds = np.append(starts, ranks.size)
    return {int(ranks[start]): ids[start:stop] for start, stop in itertools.pairwise(bounds)}
