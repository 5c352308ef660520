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
import torch
import torch.distributed as dist
from numpy.typing import ArrayLike, NDArray
from torch.utils.data import Sampler

from reshuffle.plan import resize
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

    A drop-in for ``DistributedSampler``: the same signature (``dataset, num_replicas, rank,
    shuffle, seed, drop_last``, positional or by name), the same attributes (``dataset``,
    ``num_replicas``, ``rank``, ``epoch``, ``shuffle``, ``seed``, ``drop_last``,
    ``num_samples``, ``total_size``) and lengths; the shuffling strategy comes on top.

    Args:
        dataset: anything with ``len()``; its ``targets`` serve as labels when the partition
            needs them and ``labels`` is not given.
        num_replicas: world size (``world_size`` is accepted too); defaults to
            ``torch.distributed``'s, or 1 when it is not initialised.
        rank: this rank; defaults to ``torch.distributed``'s, or 0.
        shuffle: False yields ``DistributedSampler(shuffle=False)``'s sequential order exactly
            (what evaluation loaders use); no strategy applies then.
        seed, drop_last: as for ``DistributedSampler`` (and the planner).
        strategy, fraction, partition, labels, **options: as for
            :class:`~reshuffle.plan.planner.ShufflePlanner`.

    Every rank yields exactly ``len(sampler)`` ids per epoch, so DDP ranks stay in step. With
    fewer samples than ranks (or none) the ``global`` strategy pads (or yields nothing) as
    ``DistributedSampler`` does. ``state_dict()`` / ``load_state_dict()`` resume mid-epoch with
    the exact remaining order; the state is plain data (JSON, ``weights_only`` loads).
    """

    STATE_EPOCH = "epoch"
    STATE_POSITION = "position"  # ids of the epoch already yielded (the trainer may overwrite it)
    STATE_CONFIG = "config"
    STATE_PLANNER = "planner"
    STATE_RESIZED = "resized"  # mid-epoch at another world size: what the old ranks had left

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        *,
        strategy: str = "global",
        fraction: float = 0.0,
        partition: str = "random",
        labels: ArrayLike | None = None,
        world_size: int | None = None,
        **options: Any,
    ) -> None:
        if world_size is not None and num_replicas is not None and world_size != num_replicas:
            raise ValueError(f"num_replicas={num_replicas} and world_size={world_size} differ; give one")
        rank, num_replicas = rank_and_world(rank, num_replicas if num_replicas is not None else world_size,
                                            name="num_replicas")  # fmt: skip
        self.dataset: Sized | None = dataset  # None when made from a planner
        self.shuffle, self.seed, self.drop_last = bool(shuffle), seed, bool(drop_last)
        plain_order = not self.shuffle or len(dataset) < num_replicas
        if plain_order and (strategy != "global" or fraction or partition != "random" or options):
            why = "shuffle=False yields the sequential order" if not self.shuffle else (
                f"{len(dataset)} samples for {num_replicas} ranks leave ranks without a sample of their own"
            )  # fmt: skip
            raise ValueError(f"{why}; strategy {strategy!r} / partition {partition!r} need shuffle=True and "
                             "at least one sample per rank (leave them at their defaults)")  # fmt: skip
        partition_cls = PARTITIONS.get(partition)
        if labels is None and partition_cls is not None and partition_cls.requires_labels:
            labels = getattr(dataset, "targets", None)
        self.planner = None if plain_order else ShufflePlanner(
            len(dataset), num_replicas, strategy=strategy, fraction=fraction, partition=partition,
            labels=labels, seed=seed, drop_last=drop_last, **options,
        )  # fmt: skip
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
        sampler.dataset, sampler.shuffle, sampler.seed, sampler.drop_last = (
            None,
            True,
            planner.seed,
            planner.drop_last,
        )
        sampler.num_replicas = planner.world_size
        sampler.rank = rank
        sampler._reset()
        return sampler

    def _reset(self) -> None:
        self.epoch = 0
        self._resume_at = 0  # where the next iteration starts (set by load_state_dict)
        self._position = 0  # ids of the current epoch yielded so far
        self._finished = False  # a pass ran to its end since the last set_epoch (or load)
        self._loaded = False  # the epoch came from load_state_dict: its rest is yielded once
        self._resized: dict[str, Any] | None = None  # see reshuffle.plan.resize
        self._dealt: NDArray[np.int64] | None = None
        self._warned = False

    def _dataset_size(self) -> int:
        assert self.dataset is not None  # a sampler without a planner has its dataset
        return len(self.dataset)

    @property
    def num_samples(self) -> int:
        """Ids per rank per epoch (``DistributedSampler.num_samples``)."""
        if self.planner is not None:
            return self.planner.samples_per_rank
        n, m = self._dataset_size(), self.num_replicas
        return n // m if self.drop_last else -(-n // m)

    @property
    def total_size(self) -> int:
        return self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration yields; call it before every epoch."""
        if epoch != self.epoch:
            self._resume_at, self._loaded = 0, False  # a loaded position belongs to the loaded epoch only
        self.epoch = epoch
        self._position = self._resume_at
        self._finished = False

    @property
    def position(self) -> int:
        """Ids of the current epoch yielded so far (a prefetching DataLoader runs ahead of training)."""
        return self._position

    @property
    def resumed_at(self) -> int:
        """Where the next pass over the current epoch starts (a loaded mid-epoch position, else 0)."""
        return self._resume_at

    @property
    def epoch_size(self) -> int:
        """Ids of the current epoch, resumed prefix included."""
        return self._epoch_size(self.epoch)

    @property
    def remaining(self) -> int:
        """Ids the next iteration yields: the epoch's share minus a resumed prefix."""
        return self._epoch_size(self.epoch) - self._resume_at

    def __len__(self) -> int:
        """The rank's share of the epoch, as DistributedSampler's ``num_samples``, also after a
        mid-epoch load (a resumed pass yields :attr:`remaining` of it): loops that size an epoch
        once, as Lightning's, count the whole epoch's batches."""
        return self._epoch_size(self.epoch)

    def _epoch_size(self, epoch: int) -> int:
        if self._resized is not None and self._resized["epoch"] == epoch:  # the rest of a resized epoch
            return (
                len(self.indices())
                if epoch == self.epoch
                else len(
                    resize.deal_rest(
                        self._old, epoch, self._resized["position"], self.rank, self.num_replicas
                    )
                )
            )
        return self.num_samples

    def indices(self) -> NDArray[np.int64]:
        """The full order of this rank in the current epoch (what iteration yields, unresumed)."""
        if self._resized is not None and self._resized["epoch"] == self.epoch:
            if self._dealt is None:
                self._dealt = resize.deal_rest(self._old, self.epoch, self._resized["position"], self.rank,
                                               self.num_replicas)  # fmt: skip
            return self._dealt
        if self.planner is not None:
            return self.planner.plan(self.epoch).indices(self.rank)
        return distributed_order(self._dataset_size(), self.num_replicas, self.rank, self.epoch, self.seed,
                                 self.shuffle, self.drop_last)  # fmt: skip

    def __iter__(self) -> Iterator[int]:
        # A generator: nothing happens until the first id is asked for. The resume position is
        # dropped only when a pass ends, so iterators that are made and dropped (DataLoader's
        # workers make two, StatefulDataLoader prefetches before it loads a state) lose nothing.
        if self._finished and not self._warned:
            warnings.warn(
                "ShuffleSampler was iterated again without set_epoch(): this pass repeats the "
                "previous order. Call sampler.set_epoch(epoch) before each epoch.",
                stacklevel=2,
            )
            self._warned = True
        start = self._resume_at
        self._position = start
        size = self._epoch_size(self.epoch)
        if start == size:  # a loaded epoch that is over stays over until set_epoch moves on
            return
        self._finished = False
        for index in self.indices()[start:].tolist():
            self._position += 1
            yield index
        if self._loaded:  # a loaded epoch's rest is yielded once: StatefulDataLoader, resuming from
            self._resume_at = size  # a snapshot, runs one pass to the end and then starts another
        else:
            self._finished, self._resume_at = True, 0

    def state_dict(self) -> dict[str, Any]:
        """Epoch, position within it, configuration and planner state (plain data).

        ``position`` counts the ids this sampler has yielded. A ``DataLoader`` that prefetches
        pulls ahead of training; a trainer that knows how many samples it consumed should set
        ``state[ShuffleSampler.STATE_POSITION]`` to that number before saving.
        """
        state = {
            self.STATE_EPOCH: self.epoch,
            self.STATE_POSITION: self._position,
            self.STATE_CONFIG: self._config(),
            self.STATE_PLANNER: self.planner.state_dict() if self.planner is not None else {},
        }
        if self._resized is not None and self._resized["epoch"] == self.epoch:
            state[self.STATE_RESIZED] = self._resized  # a resized epoch's rest, to deal it again
        return state

    def _config(self) -> dict[str, Any]:
        if self.planner is not None:
            return self.planner.config
        return {"num_samples": self._dataset_size(), "world_size": self.num_replicas, "shuffle": self.shuffle,
                "seed": self.seed, "drop_last": self.drop_last}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next iteration yields the rest of the saved epoch, in the same order.

        The state may come from any rank of the same job (positions are equal on all ranks). A
        state taken at an epoch's end stays in that epoch, finished: iterating it again yields
        nothing and ``set_epoch(epoch + 1)`` starts the next, as torchdata's
        ``StatefulDistributedSampler`` does (so the natural loop ``for epoch in range(saved_epoch,
        epochs): set_epoch(epoch); ...`` neither repeats nor skips an epoch). The loaded epoch's
        rest is yielded once: later passes over it yield nothing until :meth:`set_epoch` selects
        another epoch (``StatefulDataLoader`` resuming from a snapshot iterates twice). An epoch set with
        :meth:`set_epoch` before the load (``StatefulDataLoader`` loads lazily, at ``iter()``)
        wins when it is later than the state's: the saved epoch is over. A state saved at another
        world size loads too (elastic resume, see :mod:`reshuffle.plan.resize`).

        Raises:
            ValueError: if the state comes from a differently configured sampler.
        """
        saved, position = int(state[self.STATE_EPOCH]), int(state[self.STATE_POSITION])
        size, position = self._load_plan(state, saved, position)
        if not 0 <= position <= size:
            raise ValueError(
                f"saved position {position} is outside this sampler's epoch of {size} ids: a corrupt state"
            )
        if position == size:  # finished (at this world size too): nothing of it is left
            position = self._epoch_size(saved)
        if self.epoch > saved:
            saved, position = self.epoch, 0
        self.epoch = saved
        self._resume_at = position
        self._position = position
        self._finished = False
        self._loaded = True

    def _load_plan(self, state: Mapping[str, Any], epoch: int, position: int) -> tuple[int, int]:
        """Load the planner's state (elastic when the world size differs); the saved epoch's size
        and the position in it to resume at."""
        config, planned = state.get(self.STATE_CONFIG, {}), state[self.STATE_PLANNER]
        self._resized = self._dealt = None
        if self.planner is not None and config.get("world_size", self.num_replicas) != self.num_replicas:
            old = resize.saved_planner(self.planner, config, planned)
            resize.adopt_observations(self.planner, planned)
            if not 0 < position < old.samples_per_rank:  # at a boundary: plan for this world size
                return old.samples_per_rank, position
            self._resized = {"epoch": epoch, "position": position, "world_size": old.world_size,
                             "planner": old.state_dict()}  # fmt: skip
            self._old = old
            return self._epoch_size(epoch), 0
        check_same_config(self._config(), config, what="sampler")
        if self.planner is not None:
            self.planner.load_state_dict(planned)
        if resized := state.get(self.STATE_RESIZED):
            self._resized = dict(resized)
            old_config = {**config, "world_size": resized["world_size"]}
            assert self.planner is not None  # a resized state comes from a planned sampler
            self._old = resize.saved_planner(self.planner, old_config, resized["planner"])
        return self._epoch_size(epoch), position


def distributed_order(
    n: int, m: int, rank: int, epoch: int, seed: int, shuffle: bool, drop_last: bool
) -> NDArray[np.int64]:
    """``DistributedSampler``'s order for ``rank``, exactly: the whole dataset (a permutation from
    ``seed + epoch``, or in order), padded by repeating it (or truncated), then every m-th id."""
    if shuffle:
        generator = torch.Generator()
        generator.manual_seed(seed + epoch)
        order = torch.randperm(n, generator=generator).numpy()
    else:
        order = np.arange(n, dtype=np.int64)
    size = (n // m if drop_last else -(-n // m)) * m
    if size > n and n > 0:
        order = np.concatenate([order, np.resize(order, size - n)])
    return order[:size][rank::m].astype(np.int64)
