"""Opening a configured dataset, and the torch ``Dataset`` that index mode trains on."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from collections.abc import Sequence as SequenceABC
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch.utils.data import Dataset, default_collate

from reshuffle.config import ConfigError, DataConfig, SystemConfig, dataset_entry
from reshuffle.data.loaders import LOADERS
from reshuffle.data.source import SampleSource
from reshuffle.data.transforms import Transform, build_transform, sample_generator


class SubsetSource(SampleSource):
    """The first ``count`` samples of another source (``data.train_limit``)."""

    def __init__(self, source: SampleSource, count: int) -> None:
        if count < 1:
            raise ValueError(f"a subset needs at least one sample, got {count}")
        self.source = source
        self.name, self.split = source.name, source.split
        self.targets = source.targets[:count]
        self.num_classes, self.shape = source.num_classes, source.shape

    def raw(self, index: int) -> bytes:
        return self.source.raw(index)

    @property
    def decoder(self):
        return self.source.decoder

    def image(self, index: int) -> torch.Tensor:
        return self.source.image(index)

    def images_at(self, indices: Sequence[int] | NDArray[np.int64]) -> np.ndarray:
        return self.source.images_at(indices)


def open_source(data: DataConfig, split: str, system: SystemConfig) -> SampleSource:
    """The ``split`` of the dataset ``data.name`` names, as the system config says to load it."""
    entry = dataset_entry(system, data.name)
    if entry.loader not in LOADERS:
        raise ConfigError(
            f"datasets.{data.name}.loader: unknown loader {entry.loader!r}; "
            f"choose one of {', '.join(sorted(LOADERS))}"
        )
    options = dict(entry.options)
    if entry.loader == "synthetic":
        options = {**dataclasses.asdict(data.synthetic), **options}
    try:
        source = LOADERS[entry.loader](split, path=entry.path, download=entry.download, **options)
    except TypeError as error:
        raise ConfigError(f"datasets.{data.name}.options: {error}") from None
    limit = data.train_limit if split == "train" else data.test_limit
    if limit is not None and limit < len(source):
        source = SubsetSource(source, limit)
    return source


def transform_for(data: DataConfig, split: str, system: SystemConfig) -> Transform:
    """The train or test transform pipeline of ``data.name``."""
    entry = dataset_entry(system, data.name)
    names = entry.train_transforms if split == "train" else entry.test_transforms
    try:
        return build_transform(names, entry.mean, entry.std)
    except ValueError as error:
        raise ConfigError(f"datasets.{data.name}.{split}_transforms: {error}") from None


class KeyedAugmentation:
    """Mixin: random transforms draw from a generator keyed by (seed, epoch, sample id), so a
    sample's augmentation is the same in any worker, after any resume.

    The epoch lives in shared memory: DataLoader workers that outlive an epoch
    (``persistent_workers``) hold a copy of the dataset made when they started, and would
    otherwise key every later epoch's draws with that epoch. Subclasses call
    :meth:`_share_epoch` in ``__init__``."""

    seed = 0
    _epoch: torch.Tensor | None = None

    def _share_epoch(self) -> None:
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch[0]) if self._epoch is not None else 0

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        """Key the next epoch's augmentation, in this process and in its DataLoader workers (the
        seed is copied when workers start: set it before the first epoch)."""
        if self._epoch is None:
            self._share_epoch()
        assert self._epoch is not None
        self._epoch[0] = epoch
        if seed is not None:
            self.seed = seed

    def augment(self, transform: Transform, image: torch.Tensor, sample_id: int) -> torch.Tensor:
        generator = sample_generator(self.seed, self.epoch, sample_id) if transform.random else None
        return transform(image, generator)

    def augment_batch(
        self, transform: Transform, images: np.ndarray, ids: Sequence[int] | NDArray[np.int64]
    ) -> torch.Tensor:
        """:meth:`augment` on a uint8 batch, vectorised where the pipeline allows."""
        rngs = [sample_generator(self.seed, self.epoch, int(i)) for i in ids] if transform.random else None
        return transform.batch(images, rngs)


class CollatedBatch(SequenceABC):
    """A batch a dataset's ``__getitems__`` fetched in one call, already stacked.

    :func:`collate` hands its ``(images, labels, ids)`` tensors straight through; any other
    ``collate_fn`` (PyTorch's default included) sees an ordinary sequence of ``(image, label, id)``
    samples, so a plain ``DataLoader`` still works, just without the speed-up.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        self.tensors = (images, labels, ids)

    def __len__(self) -> int:
        return len(self.tensors[2])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:  # type: ignore[override]
        images, labels, ids = self.tensors
        return images[index], int(labels[index]), int(ids[index])


def collate(data: Any) -> Any:
    """The DataLoader ``collate_fn`` for reshuffle's datasets: batched fetches pass through,
    anything else goes to PyTorch's ``default_collate``."""
    if isinstance(data, CollatedBatch):
        return data.tensors
    return default_collate(data)


class SourceDataset(KeyedAugmentation, Dataset):
    """Map-style dataset over a source: item ``i`` is ``(transform(image), label, i)``.

    The sample id travels with the batch so the trainer can record per-sample losses.
    """

    def __init__(self, source: SampleSource, transform: Transform) -> None:
        self.source = source
        self.transform = transform
        self._share_epoch()
        self.targets = source.targets

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image = self.augment(self.transform, self.source.image(index), int(index))
        return image, int(self.targets[index]), int(index)

    def __getitems__(self, indices: Sequence[int]) -> CollatedBatch:
        ids = np.asarray(indices, dtype=np.int64)
        images = self.augment_batch(self.transform, self.source.images_at(ids), ids)
        return CollatedBatch(images, torch.from_numpy(self.targets[ids]), torch.from_numpy(ids))
