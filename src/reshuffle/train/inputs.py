"""The data a rank trains on: :class:`~reshuffle.ShuffledData` over the configured source, and
the batches of an epoch: through a ``DataLoader``, or gathered from a copy of the whole training
set kept on the device (``train.resident``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from reshuffle.config import ConfigError, RunConfig, SystemConfig, planner_settings
from reshuffle.data import open_source, transform_for
from reshuffle.data.dataset import SourceDataset, collate
from reshuffle.data.source import SampleSource
from reshuffle.shuffled import ShuffledData
from reshuffle.train import distributed, run_files


def shuffled_data(
    config: RunConfig, system: SystemConfig, run_dir: Path, ctx: distributed.DistContext
) -> tuple[ShuffledData, SampleSource]:
    """The public data path over the training set, index or store mode as configured."""
    source = open_source(config.data, "train", system)
    shuffle = config.shuffle
    data = ShuffledData(
        source, shuffle.store_dir or run_dir / "store", mode=shuffle.mode, partition=shuffle.partition,
        labels=source.targets, seed=config.seed, drop_last=shuffle.drop_last, epochs=config.train.epochs,
        rank=ctx.rank, world_size=ctx.world_size,
        transform=transform_for(config.data, "train", system), track_losses=config.train.track_losses,
        chunk_mb=shuffle.exchange_chunk_mb, timeout_s=config.dist.timeout_s,
        dataset_id=run_files.dataset_identity(config),
        **planner_settings(shuffle, config.dist.ranks_per_node or ctx.local_world),
    )  # fmt: skip
    return data, source


class ResidentBatches:
    """An epoch's batches gathered on the device from a copy of the whole training set, decoded
    and transformed once (``train.resident``): no loader, no host-to-device copy per step, so the
    device runs ahead. The same ids in the same order as the ``DataLoader`` path gives, and the
    same tensors: the transform is deterministic (no random augmentation), applied batch-wise."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, sampler: Any, batch_size: int) -> None:
        self.images, self.labels, self.sampler, self.batch_size = images, labels, sampler, batch_size

    def __len__(self) -> int:
        return -(-self.sampler.remaining // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        ids = torch.as_tensor(np.fromiter(iter(self.sampler), dtype=np.int64))  # the epoch's order, once
        device_ids = ids.to(self.images.device, non_blocking=True)
        for first in range(0, ids.numel(), self.batch_size):
            chosen = ids[first : first + self.batch_size]
            # labels and ids from the host (counted there without waiting for the device)
            yield self.images[device_ids[first : first + self.batch_size]], self.labels[chosen], chosen


def resident_copy(
    data: ShuffledData, device: torch.device, mode: str
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The training set decoded, transformed and on ``device`` (``train.resident``: ``on``, or
    ``auto``: on a GPU when it takes at most a quarter of the free memory), or None: store mode,
    random augmentation, or not worth it. Any source works (decoded once, in slices)."""
    dataset = data.dataset
    if mode == "off" or data.mode != "index" or not isinstance(dataset, SourceDataset):
        return None
    source, transform = dataset.source, dataset.transform
    if transform.random:
        if mode == "on":
            raise ConfigError(
                "train.resident=on keeps the training set decoded and transformed on the device: it "
                "needs index mode and no random augmentation in the train transforms; use "
                "train.resident=auto or off"
            )
        return None
    floats = len(source) * int(np.prod(source.shape)) * 4
    if mode == "auto" and (device.type != "cuda" or floats > torch.cuda.mem_get_info(device)[0] // 4):
        return None
    images = torch.empty((len(source), *source.shape), dtype=torch.float32, device=device)
    for first in range(0, len(source), 8192):  # transformed in slices: the host holds one at a time
        ids = np.arange(first, min(first + 8192, len(source)))
        images[first : first + ids.size] = transform.batch(source.images_at(ids)).to(device)
    return images, torch.as_tensor(np.asarray(source.targets), dtype=torch.int64)  # labels stay on the host


def epoch_batches(
    data: ShuffledData, resident: tuple[torch.Tensor, torch.Tensor] | None, batch_size: int, workers: int,
    pin_memory: bool, seed: int,
) -> DataLoader | ResidentBatches:  # fmt: skip
    """The batches of the selected epoch: from the resident copy, or through a DataLoader."""
    if resident is not None:
        return ResidentBatches(*resident, data.sampler, batch_size)
    return DataLoader(
        data.dataset, batch_size=batch_size, sampler=data.sampler, num_workers=workers, collate_fn=collate,
        pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
