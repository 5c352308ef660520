"""Opening a configured dataset, and the torch ``Dataset`` that index mode trains on."""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.data import Dataset

from reshuffle.config import ConfigError, DataConfig, SystemConfig, dataset_entry
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


def open_source(data: DataConfig, split: str, system: SystemConfig) -> SampleSource:
    """The ``split`` of the dataset ``data.name`` names, as the system config says to load it."""
    from reshuffle.data import LOADERS

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
    """Mixin: random transforms draw from a generator keyed by (seed, epoch, sample id)."""

    seed = 0
    epoch = 0

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        """Key the next epoch's augmentation (call before creating the epoch's DataLoader)."""
        self.epoch = epoch
        if seed is not None:
            self.seed = seed

    def augment(self, transform: Transform, image: torch.Tensor, sample_id: int) -> torch.Tensor:
        generator = sample_generator(self.seed, self.epoch, sample_id) if transform.random else None
        return transform(image, generator)


class SourceDataset(KeyedAugmentation, Dataset):
    """Map-style dataset over a source: item ``i`` is ``(transform(image), label, i)``.

    The sample id travels with the batch so the trainer can record per-sample losses.
    """

    def __init__(self, source: SampleSource, transform: Transform) -> None:
        self.source = source
        self.transform = transform
        self.targets = source.targets

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image = self.augment(self.transform, self.source.image(index), int(index))
        return image, int(self.targets[index]), int(index)
