"""The contract every shuffling strategy implements.

A strategy decides, for each epoch, which sample sits in which slot of every rank (the balanced
slots of :class:`~reshuffle.plan.layout.Layout`), and which ids move between ranks from one
epoch to the next. It is pure: (seed, epoch, rank, its own state) in, arrays out; no
``torch.distributed``, no files. The planner adds what is common to all strategies: the local
training order, padding and truncation.

A strategy may keep state that grows from observations (per-sample losses for ``importance``).
Two rules keep plans deterministic: :meth:`Strategy.observe` for epoch ``e`` may change only the
plans of epochs after ``e``, and everything observed goes into :meth:`Strategy.state_dict`.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from reshuffle.plan.layout import Layout
from reshuffle.plan.partitions import InitialPartition


@dataclass(frozen=True)
class PlanContext:
    """Everything a strategy may depend on, fixed for the life of a planner."""

    layout: Layout
    partition: InitialPartition  # who holds what at epoch 0
    seed: int
    fraction: float  # Q, for strategies that exchange a fraction of each partition
    labels: NDArray[np.int64] | None
    options: Mapping[str, Any] = field(default_factory=dict)  # strategy-specific keywords


class Strategy(abc.ABC):
    """Base class of the strategies registered in :data:`reshuffle.plan.strategies.STRATEGIES`.

    Subclasses set ``name`` and implement :meth:`slots`, :meth:`sends` and :meth:`receives`;
    ``option_defaults`` lists any extra keyword options they accept (validated by the planner).
    """

    name: ClassVar[str]
    uses_fraction: ClassVar[bool] = False
    uses_losses: ClassVar[bool] = False  # the trainer reduces per-sample losses and calls observe()
    option_defaults: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, context: PlanContext) -> None:
        self.context = context
        self.layout = context.layout
        self._where: dict[int, tuple[NDArray[np.int64], NDArray[np.int64]]] = {}  # locate()'s tables

    @abc.abstractmethod
    def slots(self, epoch: int, rank: int) -> NDArray[np.int64]:
        """Ids held by ``rank`` in ``epoch``, in slot order; shape ``(layout.size(rank),)``."""

    def held(self, epoch: int, rank: int) -> NDArray[np.int64]:
        """:meth:`slots`, read-only (an :class:`~reshuffle.plan.planner.EpochPlan` keeps what it
        asked for, so one epoch's slots are computed once per plan)."""
        ids = self.slots(epoch, rank)
        ids.flags.writeable = False
        return ids

    @abc.abstractmethod
    def sends(self, epoch: int, rank: int) -> dict[int, NDArray[np.int64]]:
        """``{dst: sorted ids}`` that leave ``rank`` between ``epoch`` and ``epoch + 1``."""

    @abc.abstractmethod
    def receives(self, epoch: int, rank: int) -> dict[int, NDArray[np.int64]]:
        """``{src: sorted ids}`` that arrive at ``rank`` between ``epoch`` and ``epoch + 1``."""

    def locate(self, epoch: int, ids: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """(rank, slot) holding each of ``ids`` in ``epoch``: the inverse of :meth:`slots`.

        This default tabulates every rank's slots of the epoch (O(N), the two latest epochs
        kept); strategies that can invert their slots pointwise override it.
        """
        if epoch not in self._where:
            owner = np.empty(self.layout.num_samples, dtype=np.int64)
            slot = np.empty(self.layout.num_samples, dtype=np.int64)
            for rank in range(self.layout.world_size):
                held = self.slots(epoch, rank)
                owner[held], slot[held] = rank, np.arange(held.size, dtype=np.int64)
            self._where[epoch] = (owner, slot)
            for old in sorted(self._where)[:-2]:
                del self._where[old]
        owner, slot = self._where[epoch]
        return owner[ids], slot[ids]

    def forget_located(self) -> None:
        """Drop the tables :meth:`locate` built; call it whenever the slots may change (new
        losses observed, a state loaded)."""
        self._where.clear()

    def order(self, epoch: int, rank: int, held: NDArray[np.int64]) -> NDArray[np.int64] | None:
        """``rank``'s training order of its holdings ``held`` in ``epoch`` (a permutation of
        them), or None for the planner's: a uniformly random permutation."""
        return None

    @classmethod
    def expected_churn(cls, layout: Layout, fraction: float) -> float | None:
        """Expected fraction of a rank's holdings that is new each epoch, if known in closed form."""
        return None

    @classmethod
    def expected_coverage(cls, layout: Layout, fraction: float, epochs: int) -> float | None:
        """Expected fraction of the dataset a rank has trained on after ``epochs`` epochs."""
        return None

    def needs_losses_of(self, epoch: int) -> bool:
        """Whether the slots of ``epoch + 1`` depend on the losses observed in ``epoch``.

        Then the move into ``epoch + 1`` can only be planned (and a store-mode exchange started)
        after :meth:`observe` for ``epoch``, not while ``epoch`` trains.
        """
        return False

    def observe(self, epoch: int, ids: NDArray[np.int64], losses: NDArray[np.floating]) -> None:  # noqa: B027
        """Record per-sample losses seen in ``epoch``; most strategies ignore them (no-op)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`observe` accumulated (empty for stateless strategies)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if state:
            raise ValueError(
                f"strategy {self.name!r} keeps no state, but the state to load has keys "
                f"{sorted(state)}; it was saved by a different strategy"
            )
