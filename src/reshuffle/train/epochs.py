"""The one epoch loop of ``reshuffle run``, for real and virtual ranks alike.

Whatever trains (one rank of a DDP job, :class:`~reshuffle.train.loop.Run`; every rank of a
virtual job in one process, :class:`~reshuffle.train.virtual.VirtualRun`) sits behind
:class:`Ranks`: the loop selects each epoch on the data path (commit the exchange into it, start
the next), asks the ranks to train its steps and to finish it, stops at ``train.max_steps``, and
writes the summary, the same way for both.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol

from reshuffle.config import RunConfig
from reshuffle.shuffled import ShuffledData
from reshuffle.train import run_files
from reshuffle.train.outputs import MetricsFiles


class Ranks(Protocol):
    """What the epoch loop asks of the ranks this process trains: one rank of a DDP job
    (:class:`~reshuffle.train.loop.Run`), or every rank of a virtual one
    (:class:`~reshuffle.train.virtual.VirtualRun`)."""

    @property
    def outputs(self) -> MetricsFiles | None:
        """Rank 0's metrics files (None on the other ranks)."""
        ...

    def first_step(self) -> int:
        """The step the selected epoch starts at (> 0 in a resumed epoch)."""
        ...

    def train_epoch(self, epoch: int, first_step: int, partial: list[float] | None) -> tuple[Any, bool]:
        """The epoch's steps from ``first_step``: its totals, and whether it ran to its end."""
        ...

    def finish_epoch(self, epoch: int, totals: Any, epoch_started: float, commit_s: float) -> dict[str, Any]:
        """The epoch boundary: evaluation, metrics rows, checkpoint; the epoch's row."""
        ...

    def reached_max_steps(self) -> bool: ...


def run_epochs(
    ranks: Ranks, data: ShuffledData, config: RunConfig, run_dir: Path, world_size: int, start_epoch: int,
    partial: list[float] | None, started: float,
) -> dict[str, Any]:  # fmt: skip
    """The epoch loop of every run, real or virtual: select the epoch (commit the exchange into
    it, start the next), train its steps, finish it; stop at ``train.max_steps``; the summary."""
    last_row: dict[str, Any] = {}
    for epoch in range(start_epoch, config.train.epochs):
        epoch_started = time.perf_counter()
        data.set_epoch(epoch)  # commits the exchange into this epoch, starts the next one
        commit_s = time.perf_counter() - epoch_started if epoch > start_epoch else 0.0
        first_step = ranks.first_step()  # > 0 in a resumed epoch (of another world size: its rest, dealt)
        totals, finished = ranks.train_epoch(epoch, first_step, partial if epoch == start_epoch else None)
        if not finished:
            break
        last_row = ranks.finish_epoch(epoch, totals, epoch_started, commit_s)
        if ranks.reached_max_steps():
            break
    data.close()  # an exchange in flight and the last commit's upkeep end with the job
    return run_files.finish(run_dir, config, world_size, last_row, time.time() - started, ranks.outputs)
