"""Map-style datasets over one rank's store, for an ordinary ``DataLoader``.

Items are looked up by *global* sample id (what the plan's ``indices`` yield) and read through
mmap. :class:`StoreDataset` serves reshuffle's own sample sources: decoded, transformed, and
returned as ``(image, label, id)`` like index mode's :class:`~reshuffle.data.SourceDataset`.
:class:`StoreItems` serves any other dataset's items, exactly as its ``__getitem__`` returned them
(see :mod:`reshuffle.data.items`). Both work with DataLoader workers (fork or spawn) and with
``persistent_workers``: a worker that finds an id its copy of the store does not hold rereads the
committed state (another epoch was committed since the worker started).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset

from reshuffle.data.dataset import CollatedBatch, KeyedAugmentation
from reshuffle.data.transforms import Transform
from reshuffle.store.rank_store import RankStore

T = TypeVar("T")
# Batches of the epoch's order announced to the kernel with a batch whose reads go to the disk, so
# that its queue holds the next ones while a worker reads this one (bench/scale.py, page cache 30%
# of the store: 1.17x the samples/s of announcing each batch alone with 3, 1.18x with 8).
AHEAD_BATCHES = 3


class _StoreReader:
    """The store a dataset reads, set once the rank's store is staged or reopened, and the order
    its batches come in this epoch (:meth:`follow`).

    The order lives in shared memory, as ``[generation, length, ids...]``: DataLoader workers that
    outlive an epoch (``persistent_workers``) hold a copy of the dataset made when they started,
    and see each later epoch's order there; each keeps the ids sorted for its look-ups, rebuilt
    when the generation changes."""

    store: RankStore | None = None
    _shared: torch.Tensor | None = None
    _written = 0  # the generation this process last wrote (the process that follows)
    _seen = -1  # the generation _order and _by_id hold
    _order: np.ndarray | None = None
    _by_id: tuple[np.ndarray, np.ndarray] | None = None  # the order's ids sorted, their places

    def follow(self, order: np.ndarray | None) -> None:
        """The order this rank reads the epoch in (the plan's; None: unknown), for this process
        and its DataLoader workers, persistent ones included: call it before iterating. A batch
        found in it announces the reads of the next ``AHEAD_BATCHES`` batches with its own; a
        batch that is not (a user's own sampler, an order from an epoch before) its own only."""
        ids = None if order is None else np.asarray(order, dtype=np.int64)
        length = -1 if ids is None else ids.size
        shared = self._shared
        if shared is None and ids is None:
            self._remember(None, -1)
            return
        if shared is None or shared.numel() - 2 < length:
            if shared is not None:
                shared[0] = -1  # workers that hold the old one stop using it
            shared = torch.zeros(2 + length + length // 4, dtype=torch.int64).share_memory_()
            self._shared = shared
        self._written += 1
        shared[0] = -1  # being written: a worker that reads now takes no order
        if ids is not None:
            shared[2 : 2 + length] = torch.from_numpy(ids)
        shared[1] = length
        shared[0] = self._written
        self._remember(ids, self._written)

    def _remember(self, order: np.ndarray | None, generation: int) -> None:
        self._order, self._seen = order, generation
        if order is None:
            self._by_id = None
            return
        places = np.argsort(order, kind="stable")
        self._by_id = order[places], places

    def _followed(self) -> np.ndarray | None:
        """The order last followed, read from shared memory when another process wrote it."""
        shared = self._shared
        if shared is None:
            return self._order
        generation = int(shared[0])
        if generation < 0:
            return None
        if generation != self._seen:
            length = int(shared[1])
            order = shared[2 : 2 + length].numpy().copy() if length >= 0 else None
            if int(shared[0]) != generation:  # written again while copied
                return None
            self._remember(order, generation)
        return self._order

    def _ahead(self, sample_ids: np.ndarray) -> np.ndarray | None:
        """The ids of the next batches after ``sample_ids`` in the order, if the batch is there."""
        order = self._followed()
        if order is None or self._by_id is None or sample_ids.size == 0:
            return None
        ids, places = self._by_id
        found = int(ids.searchsorted(sample_ids[0]))
        if found == ids.size or ids[found] != sample_ids[0]:
            return None
        start = int(places[found])
        end = start + sample_ids.size
        if not np.array_equal(order[start:end], sample_ids):
            return None
        return order[end : end + AHEAD_BATCHES * sample_ids.size]

    def _opened(self) -> RankStore:
        if self.store is None:
            raise RuntimeError(
                "the store-mode dataset was read before its store was opened; call set_epoch(epoch) "
                "on the ShuffledData before iterating the DataLoader"
            )
        return self.store

    def _held(self, read: Callable[[RankStore], T]) -> T:
        """``read(store)``; a worker started before the last commit that finds an id its copy of
        the store does not hold rereads the committed state once and tries again."""
        store = self._opened()
        try:
            return read(store)
        except KeyError:
            if not store.refresh():
                raise
            return read(store)

    def _sample(self, sample_id: int) -> tuple[bytes | memoryview, int]:
        return self._held(lambda store: store.sample(sample_id))

    def _many(
        self, sample_ids: np.ndarray, head_size: Callable[[bytes], int | None] | None = None
    ) -> Iterator[Any]:
        """A batch's records, their disk reads announced together, with the next batches' (see
        :meth:`RankStore.read_many`)."""
        return self._held(
            lambda store: store.read_many(sample_ids, head_size, lambda: self._ahead(sample_ids))
        )

    def __len__(self) -> int:
        return len(self.store) if self.store is not None else 0


class StoreDataset(_StoreReader, KeyedAugmentation, Dataset):
    """Serves the samples a rank's store holds at its committed epoch.

    Args:
        store: the rank's store (or None until it is staged).
        decode: raw bytes -> uint8 image tensor (the source's ``decode``).
        transform: the pipeline from a uint8 image to the model input.
    """

    def __init__(
        self,
        store: RankStore | None,
        decode: Callable[[bytes | memoryview], torch.Tensor],
        transform: Transform,
    ) -> None:
        self._share_epoch()
        self.store = store
        self.decode = decode
        self.transform = transform

    def __getitem__(self, sample_id: int) -> tuple[torch.Tensor, int, int]:
        raw, label = self._sample(int(sample_id))
        return self.augment(self.transform, self.decode(raw), int(sample_id)), label, int(sample_id)

    def __getitems__(self, sample_ids: Sequence[int]) -> CollatedBatch:
        """A whole batch in one call (see :class:`~reshuffle.data.dataset.CollatedBatch`)."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        batched = hasattr(self.decode, "batch")
        gathered = self._held(lambda store: store.samples(ids, lambda: self._ahead(ids))) if batched else None
        if gathered is not None:  # equal-length samples and a decoder that takes a whole batch
            raw, labels = gathered
            batch = self.augment_batch(self.transform, getattr(self.decode, "batch")(raw), ids)  # noqa: B009
            return CollatedBatch(batch, torch.from_numpy(labels), torch.from_numpy(ids))
        raws = self._many(ids)
        store = self._opened()  # refreshed by _many if it had to be
        labels = store.reader.labels[store.position(ids)]
        images = [self.decode(raw).numpy() for raw in raws]
        batch = self.augment_batch(self.transform, np.stack(images), ids)
        return CollatedBatch(batch, torch.from_numpy(labels), torch.from_numpy(ids))


class StoreItems(_StoreReader, Dataset):
    """Item ``i`` is the item the source dataset's ``__getitem__(i)`` returned, read from the store."""

    def __init__(self, store: RankStore | None, decode: Callable[[bytes | memoryview], Any]) -> None:
        self.store = store
        self.decode = decode

    def __getitem__(self, sample_id: int) -> Any:
        return self.__getitems__([sample_id])[0]

    def __getitems__(self, sample_ids: Sequence[int]) -> list[Any]:
        """A whole batch (what a DataLoader asks for): the reads of its samples overlap, and an
        item's large bytes value is read straight into the ``bytes`` it returns (the decoder's
        ``head_size``, :mod:`reshuffle.data.items`)."""
        head_size = getattr(self.decode, "head_size", None)
        return [self.decode(raw) for raw in self._many(np.asarray(sample_ids, dtype=np.int64), head_size)]
