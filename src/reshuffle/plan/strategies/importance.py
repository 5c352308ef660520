"""``importance``: partition by per-sample importance instead of at random (DAIS 2023).

* Epochs ``0 .. warmup_epochs - 1`` shuffle globally while the trainer reports per-sample losses
  (reduced over ranks, so every rank observes the same numbers).
* At epoch ``warmup_epochs`` the dataset is re-partitioned: importance per sample is the mean or
  the unbiased variance (``measure``) of its losses over the warm-up epochs after the first
  ``ignore_epochs``; ids are sorted by importance, highest first (ties by id), and dealt out as
  ``stripes`` (position i to rank i mod M: every rank gets the same mix of easy and hard samples)
  or ``blocks`` (contiguous runs: rank 0 the hardest).
* Ranks then keep that partition, reshuffled locally each epoch, for ``interval_epochs`` epochs
  and re-partition again from the losses observed since the last re-partition; or forever when
  ``interval_epochs`` is 0 (``once``).

A re-partition is an exchange of set differences (the planner's ``sends``/``receives``), so store
mode moves exactly the samples that change rank. Because the partition of epoch e depends on the
losses of epoch e - 1, that exchange cannot overlap epoch e - 1: :meth:`needs_losses_of` tells the
trainer to run it at the boundary instead. Memory: O(N) per rank (three float64 loss sums, and the
last two importance orders).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from reshuffle.plan.importance import ASSIGNMENTS, MEASURES, LossWindow, assign, owners, rank_by_importance
from reshuffle.plan.layout import group_by_rank
from reshuffle.plan.strategies.base import PlanContext, Strategy
from reshuffle.plan.strategies.global_shuffle import GlobalStrategy


class ImportanceStrategy(Strategy):
    name = "importance"
    uses_losses = True
    option_defaults: ClassVar[Mapping[str, Any]] = {
        "warmup_epochs": 2,
        "ignore_epochs": 0,
        "interval_epochs": 0,
        "measure": "mean",
        "assignment": "stripes",
    }

    def __init__(self, context: PlanContext) -> None:
        super().__init__(context)
        options = context.options
        self.warmup = _count("warmup_epochs", options["warmup_epochs"], minimum=1)
        self.ignore = _count("ignore_epochs", options["ignore_epochs"], minimum=0)
        self.interval = _count("interval_epochs", options["interval_epochs"], minimum=0)
        self.measure = _one_of("measure", options["measure"], MEASURES)
        self.assignment = _one_of("assignment", options["assignment"], ASSIGNMENTS)
        needed = 2 if self.measure == "variance" else 1
        if self.warmup - self.ignore < needed:
            raise ValueError(
                f"importance: warmup_epochs={self.warmup} with ignore_epochs={self.ignore} leaves "
                f"{self.warmup - self.ignore} epoch(s) of losses; measure={self.measure!r} needs at least "
                f"{needed}: raise warmup_epochs or lower ignore_epochs"
            )
        if self.measure == "variance" and self.interval == 1:
            raise ValueError(
                "importance: measure='variance' needs at least 2 epochs of losses between re-partitions; "
                "use interval_epochs >= 2 (or 0: re-partition once)"
            )
        self._global = GlobalStrategy(context)
        self._window = LossWindow(self.layout.num_samples)
        self._orders: dict[int, NDArray[np.int64]] = {}  # re-partition epoch -> ids by importance
        self._owners: dict[int, NDArray[np.int64]] = {}  # cache: re-partition epoch -> rank per id
        self._observed = -1

    # ---- schedule

    def is_repartition(self, epoch: int) -> bool:
        """Whether ``epoch`` starts a new importance partition."""
        if epoch == self.warmup:
            return True
        return self.interval > 0 and epoch > self.warmup and (epoch - self.warmup) % self.interval == 0

    def segment(self, epoch: int) -> int | None:
        """The re-partition epoch whose partition ``epoch`` trains on; None during warm-up."""
        if epoch < self.warmup:
            return None
        if self.interval == 0:
            return self.warmup
        return self.warmup + (epoch - self.warmup) // self.interval * self.interval

    def needs_losses_of(self, epoch: int) -> bool:
        return self.is_repartition(epoch + 1)

    # ---- plans

    def _order(self, start: int) -> NDArray[np.int64]:
        if start not in self._orders:
            raise ValueError(
                f"importance: the partition of epoch {start} is decided from the losses of epochs up to "
                f"{start - 1}, which have not been observed (call planner.observe() after each epoch, or "
                f"load the state saved with them)"
            )
        return self._orders[start]

    def slots(self, epoch: int, rank: int) -> NDArray[np.int64]:
        start = self.segment(epoch)
        if start is None:
            return self._global.slots(epoch, rank)
        return assign(self._order(start), self.layout, self.assignment, rank).copy()

    def _owner_of(self, epoch: int, ids: NDArray[np.int64]) -> NDArray[np.int64]:
        start = self.segment(epoch)
        if start is None:
            return self._global.owners(epoch, ids)
        if start not in self._owners:
            self._owners = {start: owners(self._order(start), self.layout, self.assignment)}
        return self._owners[start][ids]

    def _moves_after(self, epoch: int) -> bool:
        later = self.segment(epoch + 1)
        return later is None or later != self.segment(epoch)

    def sends(self, epoch: int, rank: int) -> dict[int, NDArray[np.int64]]:
        if not self._moves_after(epoch):
            return {}
        ids = self.held(epoch, rank)
        return group_by_rank(ids, self._owner_of(epoch + 1, ids), exclude=rank)

    def receives(self, epoch: int, rank: int) -> dict[int, NDArray[np.int64]]:
        if not self._moves_after(epoch):
            return {}
        ids = self.held(epoch + 1, rank)
        return group_by_rank(ids, self._owner_of(epoch, ids), exclude=rank)

    # ---- observations and state

    def observe(self, epoch: int, ids: NDArray[np.int64], losses: NDArray[np.floating]) -> None:
        """Take epoch ``epoch``'s per-sample losses (every rank's, already reduced); when the next
        epoch re-partitions, compute its importance order from the window and start a new one."""
        if epoch <= self._observed:
            raise ValueError(
                f"importance: losses of epoch {epoch} arrive after those of epoch {self._observed}; "
                "observe each epoch once, in order"
            )
        self._observed = epoch
        first_window = epoch < self.warmup
        if first_window and epoch < self.ignore:
            return
        if self.segment(epoch + 1) is not None and not self.is_repartition(epoch + 1) and self.interval == 0:
            return  # partitioned once and for all: nothing more to learn
        self._window.add(epoch, ids, losses)
        if self.is_repartition(epoch + 1):
            self._orders[epoch + 1] = rank_by_importance(self._window.importance(self.measure))
            for old in sorted(self._orders)[:-2]:  # this partition and the one it replaces
                del self._orders[old]
            self._window = LossWindow(self.layout.num_samples)

    def state_dict(self) -> dict[str, Any]:
        return {
            "observed": self._observed,
            "window": self._window.state_dict(),
            "orders": {str(epoch): order.tolist() for epoch, order in self._orders.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        expected = {"observed", "window", "orders"}
        if set(state) != expected:
            raise ValueError(
                f"importance: the state to load has keys {sorted(state)}, expected {sorted(expected)}; "
                "it was saved by a different strategy"
            )
        self._observed = int(state["observed"])
        self._window.load_state_dict(state["window"])
        self._orders = {
            int(epoch): np.asarray(order, dtype=np.int64) for epoch, order in state["orders"].items()
        }
        self._owners = {}


def _count(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"importance: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _one_of(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"importance: unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return str(value)
