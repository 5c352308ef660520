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


class _StoreReader:
    """The store a dataset reads, set once the rank's store is staged or reopened."""

    store: RankStore | None = None

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
        """A batch's records, their disk reads announced together (see :meth:`RankStore.read_many`)."""
        return self._held(lambda store: store.read_many(sample_ids, head_size))

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
        gathered = self._held(lambda store: store.samples(ids)) if hasattr(self.decode, "batch") else None
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
