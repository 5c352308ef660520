"""``ShufflePlanner``: for any epoch, which samples each rank holds, trains on, sends and receives.

The planner is pure and deterministic: the same arguments give the same plans in any process and
in any order of :meth:`ShufflePlanner.plan` calls. A rank asks only for its own share, in
O(N/M + M) time and memory (the label partitions add one O(N) array, since the labels are O(N)).

Example:
    >>> planner = ShufflePlanner(10, 3, strategy="partial", fraction=0.5, seed=1)
    >>> plan = planner.plan(0)
    >>> [len(plan.indices(r)) for r in range(3)]  # padded to ceil(10 / 3)
    [4, 4, 4]
    >>> sum(len(ids) for ids in plan.sends(0).values())  # round(0.5 * floor(10 / 3))
    2
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from reshuffle.plan import streams
from reshuffle.plan.layout import Layout
from reshuffle.plan.nodes import node_level
from reshuffle.plan.partitions import PARTITIONS
from reshuffle.plan.strategies import STRATEGIES, PlanContext, Strategy


class EpochPlan:
    """One epoch of a :class:`ShufflePlanner`, computed lazily per rank.

    Attributes:
        epoch: the epoch this plan is for.
        world_size: M.
        num_samples: N, the dataset size.
        samples_per_rank: length of :meth:`indices` on every rank: ``ceil(N/M)``, or
            ``floor(N/M)`` with ``drop_last``.
        num_padded: repeats added over all ranks so every rank has ``samples_per_rank``.
        num_dropped: samples left out of this epoch over all ranks (``drop_last`` only); which
            ones changes with the epoch's local order.
    """

    def __init__(self, planner: ShufflePlanner, epoch: int) -> None:
        self._planner = planner
        self._strategy = planner.strategy
        self._layout = planner.layout
        self.epoch = epoch
        self.world_size = planner.world_size
        self.num_samples = planner.num_samples
        self.samples_per_rank = planner.samples_per_rank
        total = self.samples_per_rank * self.world_size
        self.num_padded = max(0, total - self.num_samples)
        self.num_dropped = max(0, self.num_samples - total)
        self._held: dict[int, NDArray[np.int64]] = {}  # rank -> slots, computed once per plan

    def _slots(self, rank: int) -> NDArray[np.int64]:
        rank = self._layout.check_rank(rank)
        if rank not in self._held:
            self._held[rank] = self._strategy.held(self.epoch, rank)
        return self._held[rank]

    def indices(self, rank: int) -> NDArray[np.int64]:
        """Global sample ids ``rank`` trains on this epoch, in order; ``samples_per_rank`` long.

        The rank's holdings in a local random order drawn from (seed, epoch, rank) (or the
        strategy's own order: ``corgipile``); padded with the first ids of that order, or
        truncated, to ``samples_per_rank``.
        """
        held = self._slots(rank)
        order = self._strategy.order(self.epoch, rank, held)  # a strategy's own (corgipile), or
        if order is None:  # a uniformly random permutation
            order = held[
                streams.rng(self._planner.seed, streams.Stream.ORDER, self.epoch, rank).permutation(held.size)
            ]
        if order.size < self.samples_per_rank:
            order = np.concatenate([order, order[: self.samples_per_rank - order.size]])
        return order[: self.samples_per_rank]

    def holdings(self, rank: int) -> NDArray[np.int64]:
        """Sorted ids ``rank`` holds this epoch (before padding or truncation)."""
        return np.sort(self._slots(rank))

    def sends(self, rank: int) -> dict[int, NDArray[np.int64]]:
        """``{dst: sorted ids}`` ``rank`` sends to other ranks before the next epoch."""
        return self._strategy.sends(self.epoch, self._layout.check_rank(rank))

    def receives(self, rank: int) -> dict[int, NDArray[np.int64]]:
        """``{src: sorted ids}`` ``rank`` receives before the next epoch; mirrors :meth:`sends`."""
        return self._strategy.receives(self.epoch, self._layout.check_rank(rank))


class ShufflePlanner:
    """Plans which samples every rank holds and trains on in each epoch.

    Args:
        num_samples: N, the dataset size.
        world_size: M, the number of ranks; ``1 <= M <= N``.
        strategy: ``"global"``, ``"local"`` or ``"partial"`` (see ``STRATEGIES``).
        fraction: Q in [0, 1], the share of each partition ``partial`` exchanges per epoch.
        partition: the initial partition: ``"random"``, ``"contiguous"``, ``"strided"``,
            ``"label-sorted"`` or ``"stratified"`` (see ``PARTITIONS``).
        labels: one integer class per sample; needed by the label partitions.
        seed: any 64-bit integer (negative too, as ``DistributedSampler`` takes); all randomness
            derives from it.
        drop_last: truncate every rank to ``floor(N/M)`` instead of padding to ``ceil(N/M)``.
        ranks_per_node: R > 1 plans at the node level (:mod:`reshuffle.plan.nodes`): the strategy
            and the initial partition apply to ``M / R`` nodes, and each node deals its samples
            afresh among its R ranks (``n * R .. n * R + R - 1``) every epoch. 1: every rank is
            its own storage island.
        **options: strategy-specific options (a strategy's ``option_defaults`` lists them).

    Raises:
        ValueError: on bad input, naming the argument and what to do instead.
    """

    def __init__(
        self,
        num_samples: int,
        world_size: int,
        *,
        strategy: str = "global",
        fraction: float = 0.0,
        partition: str = "random",
        labels: ArrayLike | None = None,
        seed: int = 0,
        drop_last: bool = False,
        ranks_per_node: int = 1,
        **options: Any,
    ) -> None:
        self.num_samples = _whole_number("num_samples", num_samples, minimum=1)
        self.world_size = _whole_number("world_size", world_size, minimum=1)
        self.seed = _whole_number("seed", seed, minimum=-(1 << 63))
        if self.seed >= 1 << 64:
            raise ValueError(f"seed must fit in 64 bits (as DistributedSampler's), got {self.seed}")
        self.layout = Layout(self.num_samples, self.world_size)
        strategy_cls = _choose("strategy", strategy, STRATEGIES)
        partition_cls = _choose("partition", partition, PARTITIONS)
        self.fraction = _fraction(fraction, strategy_cls)
        self.labels = _labels(labels, self.num_samples, partition_cls.requires_labels, partition)
        self.options = _options(options, strategy_cls)
        if not isinstance(drop_last, (bool, np.bool_)):
            raise ValueError(f"drop_last must be True or False, got {drop_last!r}")
        self.drop_last = bool(drop_last)
        self.strategy_name = strategy
        self.partition_name = partition
        self.samples_per_rank = self.layout.min_size if self.drop_last else self.layout.max_size
        self.ranks_per_node = _ranks_per_node(ranks_per_node, self.world_size)
        nodes = Layout(self.num_samples, self.world_size // self.ranks_per_node)
        context = PlanContext(
            layout=nodes,
            partition=partition_cls(nodes, self.seed, self.labels),
            seed=self.seed,
            fraction=self.fraction,
            labels=self.labels,
            options=self.options,
        )
        self.strategy: Strategy = strategy_cls(context)
        if self.ranks_per_node > 1:
            self.strategy = node_level(self.strategy, self.layout, self.ranks_per_node)

    def plan(self, epoch: int) -> EpochPlan:
        """The plan of ``epoch`` (a non-negative integer)."""
        return EpochPlan(self, _whole_number("epoch", epoch, minimum=0))

    def observe(self, epoch: int, ids: ArrayLike, losses: ArrayLike) -> None:
        """Hand per-sample losses of ``epoch`` to the strategy (used by loss-driven strategies)."""
        self.strategy.observe(epoch, np.asarray(ids, dtype=np.int64), np.asarray(losses))

    @property
    def config(self) -> dict[str, Any]:
        """The arguments that determine the plans; a saved state only loads into an equal one."""
        labels = None
        if self.labels is not None:
            labels = hashlib.sha256(np.ascontiguousarray(self.labels).tobytes()).hexdigest()[:16]
        return {
            "num_samples": self.num_samples,
            "world_size": self.world_size,
            "strategy": self.strategy_name,
            "fraction": self.fraction,
            "partition": self.partition_name,
            "seed": self.seed,
            "drop_last": self.drop_last,
            "labels_sha256": labels,
            "options": dict(self.options),
            **({"ranks_per_node": self.ranks_per_node} if self.ranks_per_node > 1 else {}),
        }

    def state_dict(self) -> dict[str, Any]:
        """The planner's configuration and its strategy's observed state."""
        return {"config": self.config, "strategy": plain(self.strategy.state_dict())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; it must come from an identically configured planner."""
        check_same_config(self.config, state.get("config", {}), what="planner")
        self.strategy.load_state_dict(state.get("strategy", {}))


def check_same_config(mine: Mapping[str, Any], saved: Mapping[str, Any], *, what: str) -> None:
    """Raise a ValueError listing each setting where ``saved`` differs from ``mine``."""
    differences = [
        f"{name}: saved {saved.get(name)!r}, this {what} has {mine.get(name)!r}"
        for name in sorted(set(mine) | set(saved))
        if saved.get(name) != mine.get(name)
    ]
    if differences:
        raise ValueError(
            f"the state was saved by a differently configured {what} ("
            + "; ".join(differences)
            + f"); construct the {what} with the saved settings, or start without the state"
        )


def _whole_number(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def _ranks_per_node(value: Any, world_size: int) -> int:
    per_node = _whole_number("ranks_per_node", value, minimum=1)
    if world_size % per_node:
        raise ValueError(
            f"ranks_per_node={per_node} does not divide the {world_size} ranks into whole nodes; "
            "give the ranks each node runs (torchrun's --nproc-per-node), or 1 for rank-level plans"
        )
    return per_node


def _choose(name: str, value: Any, registry: Mapping[str, Any]) -> Any:
    if value not in registry:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(sorted(registry))}")
    return registry[value]


def _fraction(value: Any, strategy: type[Strategy]) -> float:
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"fraction must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= fraction <= 1.0:  # also false for NaN
        raise ValueError(
            f"fraction must be in [0, 1] (the share of each partition exchanged per epoch), got {value!r}"
        )
    if fraction and not strategy.uses_fraction:
        users = sorted(name for name, cls in STRATEGIES.items() if cls.uses_fraction)
        raise ValueError(
            f"fraction={fraction} has no effect with strategy {strategy.name!r}; "
            f"use strategy {' or '.join(map(repr, users))} or leave fraction at 0"
        )
    return fraction


def _labels(
    labels: ArrayLike | None, num_samples: int, required: bool, partition: str
) -> NDArray[np.int64] | None:
    if labels is None:
        if required:
            raise ValueError(
                f"partition {partition!r} needs labels: pass labels= (one integer class per sample; "
                "ShuffleSampler reads dataset.targets) or use partition='random'"
            )
        return None
    if hasattr(labels, "detach"):  # a torch tensor, without importing torch here
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim != 1 or array.shape[0] != num_samples:
        raise ValueError(
            f"labels must be a 1-D sequence with one class per sample ({num_samples}), got shape "
            f"{array.shape}; pass the dataset's targets"
        )
    integral = np.issubdtype(array.dtype, np.integer) or (
        np.issubdtype(array.dtype, np.number) and bool(np.all(np.mod(array, 1) == 0))
    )
    if array.size and not integral:
        raise ValueError(f"labels must be integer class ids, got dtype {array.dtype}")
    return array.astype(np.int64)


def _options(options: Mapping[str, Any], strategy: type[Strategy]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(strategy.option_defaults))
    if unknown:
        accepted = ", ".join(sorted(strategy.option_defaults)) or "none"
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for strategy {strategy.name!r} (it accepts: {accepted})"
        )
    return {**strategy.option_defaults, **options}


def plain(value: Any) -> Any:
    """``value`` as plain data: numpy arrays and scalars as lists and numbers, non-finite floats as
    None (so a state is JSON and loads with ``torch.load(weights_only=True)``)."""
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        return plain(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value
