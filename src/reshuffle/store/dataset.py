"""``StoreDataset``: a map-style dataset over one rank's store, for an ordinary ``DataLoader``.

Items are looked up by *global* sample id (what the plan's ``indices`` yield), read through mmap,
decoded and transformed at read time, and returned as ``(image, label, id)`` like index mode's
:class:`~reshuffle.data.SourceDataset`. Works with DataLoader workers (fork or spawn).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from reshuffle.data.dataset import KeyedAugmentation
from reshuffle.store.rank_store import RankStore


class StoreDataset(KeyedAugmentation, Dataset):
    """Serves the samples a rank's store holds at its committed epoch.

    Args:
        store: the rank's store.
        decode: raw bytes -> uint8 image tensor (the source's ``decode``).
        transform: image tensor -> model input.
    """

    def __init__(
        self,
        store: RankStore,
        decode: Callable[[bytes], torch.Tensor],
        transform: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.store = store
        self.decode = decode
        self.transform = transform

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, sample_id: int) -> tuple[torch.Tensor, int, int]:
        raw, label = self.store.sample(int(sample_id))
        return self.augment(self.transform, self.decode(raw), int(sample_id)), label, int(sample_id)
