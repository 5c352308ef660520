"""The data a rank trains on: :class:`~reshuffle.ShuffledData` over the configured source."""

from __future__ import annotations

from pathlib import Path

from reshuffle.config import RunConfig, SystemConfig, planner_settings
from reshuffle.data import open_source, transform_for
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
        dataset_id=run_files.dataset_identity(config), **planner_settings(shuffle),
    )  # fmt: skip
    return data, source
