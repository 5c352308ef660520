"""Initial partitions: which sample sits in slot ``p`` of rank ``r`` before any exchange.

Every partition is a pointwise map ``lookup(ranks, slots) -> ids`` over the balanced
:class:`~reshuffle.plan.layout.Layout`, so a rank reads its own share, or one slot of another
rank's, without building the whole assignment. ``random``, ``contiguous`` and ``strided`` need
O(1) memory; the label partitions keep one class-sorted order of the N ids (the labels are O(N)
already).

=================  ==============================================================  =========
name               rank ``r`` holds                                                labels
=================  ==============================================================  =========
``random``         a contiguous block of a keyed random permutation               no
``contiguous``     ids ``offsets[r] .. offsets[r+1]-1``                            no
``strided``        ids ``r, r+M, r+2M, ...``                                       no
``label-sorted``   a contiguous block after sorting by label: few classes per rank  yes
``stratified``     every M-th id after sorting by label: the global class mix      yes
=================  ==============================================================  =========

Within a class the label partitions order samples by the seed, so the split of a class between
two neighbouring ranks does not follow the dataset's file order.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from numpy.typing import NDArray

from reshuffle.plan import streams
from reshuffle.plan.layout import Layout
from reshuffle.plan.permutation import KeyedPermutation


class InitialPartition:
    """Base class: subclasses set ``name`` and implement :meth:`lookup`."""

    name: ClassVar[str]
    requires_labels: ClassVar[bool] = False

    def __init__(self, layout: Layout, seed: int, labels: NDArray[np.int64] | None) -> None:
        self.layout = layout
        self.seed = seed
        self.labels = labels

    def lookup(self, ranks: NDArray[np.int64], slots: NDArray[np.int64]) -> NDArray[np.int64]:
        """Id in slot ``slots[i]`` of rank ``ranks[i]`` (arrays of one shape)."""
        raise NotImplementedError

    def locate(self, ids: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """The inverse of :meth:`lookup`: (rank, slot) of each id in ``ids``."""
        raise NotImplementedError

    def rank_ids(self, rank: int) -> NDArray[np.int64]:
        """All ids of ``rank`` in slot order, shape ``(layout.size(rank),)``."""
        slots = np.arange(self.layout.size(rank), dtype=np.int64)
        return self.lookup(np.full_like(slots, rank), slots)


class RandomPartition(InitialPartition):
    name = "random"

    def __init__(self, layout: Layout, seed: int, labels: NDArray[np.int64] | None) -> None:
        super().__init__(layout, seed, labels)
        self._permutation = KeyedPermutation(layout.num_samples, streams.key(seed, streams.Stream.PARTITION))

    def lookup(self, ranks: NDArray[np.int64], slots: NDArray[np.int64]) -> NDArray[np.int64]:
        return self._permutation.forward(self.layout.offsets[ranks] + slots)

    def locate(self, ids: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        return _block_of(self.layout, self._permutation.inverse(ids))


class ContiguousPartition(InitialPartition):
    name = "contiguous"

    def lookup(self, ranks: NDArray[np.int64], slots: NDArray[np.int64]) -> NDArray[np.int64]:
        return (self.layout.offsets[ranks] + slots).astype(np.int64)

    def locate(self, ids: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        return _block_of(self.layout, np.asarray(ids, dtype=np.int64))


class StridedPartition(InitialPartition):
    name = "strided"

    def lookup(self, ranks: NDArray[np.int64], slots: NDArray[np.int64]) -> NDArray[np.int64]:
        return (ranks + slots * self.layout.world_size).astype(np.int64)

    def locate(self, ids: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        slots, ranks = np.divmod(np.asarray(ids, dtype=np.int64), self.layout.world_size)
        return ranks, slots


class _LabelPartition(InitialPartition):
    requires_labels = True

    def __init__(self, layout: Layout, seed: int, labels: NDArray[np.int64] | None) -> None:
        super().__init__(layout, seed, labels)
        assert labels is not None  # ShufflePlanner checks this with a message for the user
        shuffled = KeyedPermutation(layout.num_samples, streams.key(seed, streams.Stream.PARTITION)).forward(
            np.arange(layout.num_samples)
        )
        # Stable sort of a random order by label: sorted by class, random within a class.
        self._class_order = shuffled[np.argsort(labels[shuffled], kind="stable")]
        self._position = np.empty_like(self._class_order)  # id -> its place in the class order
        self._position[self._class_order] = np.arange(layout.num_samples, dtype=np.int64)


class LabelSortedPartition(_LabelPartition):
    """Contiguous blocks of the class-sorted order: the adversarial non-IID case.

    With balanced classes (sizes within one of each other) a rank spans at most
    ``ceil(C / M) + 1`` of the C classes.
    """

    name = "label-sorted"

    def lookup(self, ranks: NDArray[np.int64], slots: NDArray[np.int64]) -> NDArray[np.int64]:
        return self._class_order[self.layout.offsets[ranks] + slots]

    def locate(self, ids: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        return _block_of(self.layout, self._position[ids])


class StratifiedPartition(_LabelPartition):
    """Every M-th sample of the class-sorted order: rank ``r`` holds ``floor(n_c / M)`` or
    ``ceil(n_c / M)`` samples of each class ``c`` of size ``n_c``."""

    name = "stratified"

    def lookup(self, ranks: NDArray[np.int64], slots: NDArray[np.int64]) -> NDArray[np.int64]:
        return self._class_order[ranks + slots * self.layout.world_size]

    def locate(self, ids: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        slots, ranks = np.divmod(self._position[ids], self.layout.world_size)
        return ranks, slots


def _block_of(layout: Layout, positions: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(rank, slot) of positions of the concatenated block order ``0 .. N-1``."""
    ranks = layout.rank_of(positions)
    return ranks, positions - layout.offsets[ranks]


PARTITIONS: dict[str, type[InitialPartition]] = {
    cls.name: cls
    for cls in (
        RandomPartition,
        ContiguousPartition,
        StridedPartition,
        LabelSortedPartition,
        StratifiedPartition,
    )
}
