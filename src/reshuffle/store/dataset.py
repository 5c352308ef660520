"""``StoreDataset``: a map-style dataset over one rank's store, for an ordinary ``DataLoader``.

Items are looked up by *global* sample id (what the plan's ``indices`` yield), read through mmap,
decoded and transformed at read time, and returned as ``(image, label, id)`` like index mode's
:class:`~reshuffle.data.SourceDataset`. Works with DataLoader workers (fork or spawn).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from reshuffle.data.dataset import CollatedBatch, KeyedAugmentation
from reshuffle.data.transforms import Transform
from reshuffle.store.rank_store import RankStore


class StoreDataset(KeyedAugmentation, Dataset):
    """Serves the samples a rank's store holds at its committed epoch.

    Args:
        store: the rank's store.
        decode: raw bytes -> uint8 image tensor (the source's ``decode``).
        transform: the pipeline from a uint8 image to the model input.
    """

    def __init__(
        self,
        store: RankStore,
        decode: Callable[[bytes], torch.Tensor],
        transform: Transform,
    ) -> None:
        self.store = store
        self.decode = decode
        self.transform = transform

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, sample_id: int) -> tuple[torch.Tensor, int, int]:
        raw, label = self.store.sample(int(sample_id))
        return self.augment(self.transform, self.decode(raw), int(sample_id)), label, int(sample_id)

    def __getitems__(self, sample_ids: Sequence[int]) -> CollatedBatch:
        """A whole batch in one call (see :class:`~reshuffle.data.dataset.CollatedBatch`)."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        gathered = self.store.samples(ids) if hasattr(self.decode, "batch") else None
        if gathered is not None:  # equal-length samples and a decoder that takes a whole batch
            raw, labels = gathered
            batch = self.augment_batch(self.transform, self.decode.batch(raw), ids)
            return CollatedBatch(batch, torch.from_numpy(labels), torch.from_numpy(ids))
        images, labels = [], np.empty(len(ids), dtype=np.int64)
        for position, sample_id in enumerate(ids.tolist()):
            raw, labels[position] = self.store.sample(sample_id)
            images.append(self.decode(raw).numpy())
        batch = self.augment_batch(self.transform, np.stack(images), ids)
        return CollatedBatch(batch, torch.from_numpy(labels), torch.from_numpy(ids))
