"""``ShuffleSampler``: a drop-in for ``torch.utils.data.DistributedSampler`` that follows a plan.

Index mode: every rank can read the whole dataset (a shared file system), so nothing moves; the
sampler just yields the planner's ids for its rank, which is what a store-mode rank would train
on after its exchanges.

Example::

    sampler = ShuffleSampler(dataset, strategy="partial", fraction=0.1, seed=0)
    loader = DataLoader(dataset, batch_size=64, sampler=sampler)
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            ...
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sized
from typing import Any

import numpy as np
import torch.distributed as dist
from numpy.typing import ArrayLike, NDArray
from torch.utils.data import Sampler

from reshuffle.plan.partitions import PARTITIONS
from reshuffle.plan.planner import ShufflePlanner, check_same_config


def rank_and_world(
    rank: int | None,
    world_size: int | None,
    group: dist.ProcessGroup | None = None,
    *,
    name: str = "world_size",
) -> tuple[int, int]:
    """``(rank, world_size)``: as given, else ``group``'s (or the default process group's), else
    0 and 1 when ``torch.distributed`` is not initialised; ``name`` is the caller's word for the
    world size in the error."""
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size(group) if initialised else 1
    if rank is None:
        rank = dist.get_rank(group) if initialised else 0
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {name}={world_size}), got {rank}")
    return rank, world_size


class ShuffleSampler(Sampler[int]):
    """Yields the global sample ids one rank trains on in the current epoch.

    Args:
        dataset: anything with ``len()``; its ``targets`` serve as labels when the partition
            needs them and ``labels`` is not given.
        num_replicas: world size; defaults to ``torch.distributed``'s, or 1 when it is not
            initialised.
        rank: this rank; defaults to ``torch.distributed``'s, or 0.
        strategy, fraction, partition, labels, seed, drop_last, **options: as for
            :class:`~reshuffle.plan.planner.ShufflePlanner`.

    Every rank yields exactly ``len(sampler)`` ids per epoch, so DDP ranks stay in step.
    ``state_dict()`` / ``load_state_dict()`` resume mid-epoch with the exact remaining order.
    """

    STATE_EPOCH = "epoch"
    STATE_POSITION = "position"  # ids of the epoch already yielded (the trainer may overwrite it)
    STATE_CONFIG = "config"
    STATE_PLANNER = "planner"

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        *,
        strategy: str = "global",
        fraction: float = 0.0,
        partition: str = "random",
        labels: ArrayLike | None = None,
        seed: int = 0,
        drop_last: bool = False,
        **options: Any,
    ) -> None:
        rank, num_replicas = rank_and_world(rank, num_replicas, name="num_replicas")
        partition_cls = PARTITIONS.get(partition)
        if labels is None and partition_cls is not None and partition_cls.requires_labels:
            labels = getattr(dataset, "targets", None)
        self.planner = ShufflePlanner(
            len(dataset),
            num_replicas,
            strategy=strategy,
            fraction=fraction,
            partition=partition,
            labels=labels,
            seed=seed,
            drop_last=drop_last,
            **options,
        )
        self.num_replicas = num_replicas
        self.rank = rank
        self._reset()

    @classmethod
    def from_planner(cls, planner: ShufflePlanner, rank: int) -> ShuffleSampler:
        """A sampler for ``rank`` that follows an existing planner (shared with other parts of a
        trainer, e.g. the store exchanger, so observations reach one planner)."""
        planner.layout.check_rank(rank)
        sampler = cls.__new__(cls)
        sampler.planner = planner
        sampler.num_replicas = planner.world_size
        sampler.rank = rank
        sampler._reset()
        return sampler

    def _reset(self) -> None:
        self.epoch = 0
        self._resume_at = 0  # where the next iteration starts (set by load_state_dict)
        self._position = 0  # ids of the current epoch yielded so far
        self._epoch_fresh = True  # set_epoch (or a load) happened since the last iteration
        self._warned = False

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration yields; call it before every epoch."""
        if epoch != self.epoch:
            self._resume_at = 0  # a loaded position belongs to the loaded epoch only
        self.epoch = epoch
        self._position = self._resume_at
        self._epoch_fresh = True

    def __len__(self) -> int:
        """Number of ids the next iteration yields: the rank's share, minus a resumed prefix."""
        return self.planner.samples_per_rank - self._resume_at

    def indices(self) -> NDArray[np.int64]:
        """The full order of this rank in the current epoch (what iteration yields, unresumed)."""
        return self.planner.plan(self.epoch).indices(self.rank)

    def __iter__(self) -> Iterator[int]:
        if not self._epoch_fresh and not self._warned:
            warnings.warn(
                "ShuffleSampler was iterated again without set_epoch(): this pass repeats the "
                "previous order. Call sampler.set_epoch(epoch) before each epoch.",
                stacklevel=2,
            )
            self._warned = True
        self._epoch_fresh = False
        start, self._resume_at = self._resume_at, 0
        self._position = start
        return self._yield_from(self.indices(), start)

    def _yield_from(self, indices: NDArray[np.int64], start: int) -> Iterator[int]:
        for index in indices[start:].tolist():
            self._position += 1
            yield index

    def state_dict(self) -> dict[str, Any]:
        """Epoch, position within it, configuration and planner state.

        ``position`` counts the ids this sampler has yielded. A ``DataLoader`` that prefetches
        pulls ahead of training; a trainer that knows how many samples it consumed should set
        ``state[ShuffleSampler.STATE_POSITION]`` to that number before saving.
        """
        return {
            self.STATE_EPOCH: self.epoch,
            self.STATE_POSITION: self._position,
            self.STATE_CONFIG: self.planner.config,
            self.STATE_PLANNER: self.planner.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next iteration yields the rest of the saved epoch, in the same order.

        The state may come from any rank of the same job (positions are equal on all ranks).

        Raises:
            ValueError: if the state comes from a differently configured sampler.
        """
        check_same_config(self.planner.config, state.get(self.STATE_CONFIG, {}), what="sampler")
        position = int(state[self.STATE_POSITION])
        if not 0 <= position <= self.planner.samples_per_rank:
            raise ValueError(
                f"saved position {position} is outside this sampler's epoch of "
                f"{self.planner.samples_per_rank} ids; the state is corrupt"
            )
        self.planner.load_state_dict(state[self.STATE_PLANNER])
        self.epoch = int(state[self.STATE_EPOCH])
        self._resume_at = position
        self._position = position
        self._epoch_fresh = True
