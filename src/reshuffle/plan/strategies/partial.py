"""``partial``: between epochs every rank sends exactly k = round(Q * floor(N/M)) of its samples to
other ranks and receives k, as in "Why Globally Re-shuffle?" (IPDPS 2022).

How the moves are laid out, so that a rank plans its own share in O(N/M) time and memory:

* the slots ``0 .. floor(N/M) - 1`` exist on every rank; call slot ``p`` of all ranks *column* p;
* between epochs ``t`` and ``t + 1`` a uniform random set of k columns moves (the same set on every
  rank, drawn from ``(seed, t)``); each moving column ``p`` gets a shift ``s_p`` drawn uniformly
  from ``1 .. M-1``, and the sample in slot ``p`` of rank ``r`` goes to slot ``p`` of rank
  ``(r + s_p) mod M``;
* so every rank sends exactly k and receives exactly k, never to itself, sizes stay balanced, and
  after ``e`` epochs slot ``p`` of rank ``r`` holds the sample that started in slot ``p`` of rank
  ``(r - S_e[p]) mod M``, where ``S_e`` is the running sum of column ``p``'s shifts.

Per rank the draws match "shuffle locally, send the first k to random other ranks": the k that
leave are a uniform random k-subset of the rank's first floor(N/M) slots, and each goes to (and
each arrival comes from) a uniformly random other rank. Two consequences of the column layout:
the extra slot that the first ``N % M`` ranks hold never moves, and two samples that start in the
same column on different ranks never share a rank (1 in N/M of all pairs; no effect on label
mixing or churn). ``Q = 0`` is exactly ``local``.

``S_e`` costs O(k) per epoch to advance and is cached, so consecutive epochs cost O(N/M) each; a
cold start at epoch ``e`` replays ``e`` epochs of k draws each.

``unit="block"`` (for data read in runs, with a ``contiguous`` partition of shards): the moving
columns are whole runs of ``block_size`` columns, each run with one shift, so a rank's slots that
hold consecutive ids leave and arrive as whole blocks; k is rounded to whole blocks.

``select="importance"`` (beyond the paper): which k samples leave a rank is no longer uniform but
drawn without replacement with probability proportional to each sample's importance, its most
recent (rank-reduced) loss, so hard samples circulate. The moving columns and shifts are the same
as above; before a move each rank swaps its chosen samples into the moving columns. Still exactly
k out and k in per rank, never to itself. The sends after epoch e are weighted by the losses
observed up to epoch e - 1 (uniform after epoch 0), so the exchange can still run while epoch e
trains. What a rank holds now depends on every rank's past choices, so this mode keeps the whole
slot table: O(N) memory and time per epoch on every rank, like the losses themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from reshuffle.plan import streams
from reshuffle.plan.importance import weighted_choice
from reshuffle.plan.layout import Layout, group_by_rank
from reshuffle.plan.strategies.base import PlanContext, Strategy


def moves_per_epoch(layout: Layout, fraction: float) -> int:
    """k = round(Q * floor(N/M)) for M >= 2; 0 on a single rank (there is nowhere to send)."""
    return round(fraction * layout.min_size) if layout.world_size > 1 else 0


SELECTIONS = ("random", "importance")
UNITS = ("sample", "block")


class PartialStrategy(Strategy):
    name = "partial"
    uses_fraction = True
    option_defaults: ClassVar[Mapping[str, Any]] = {"select": "random", "unit": "sample", "block_size": 256}

    def __init__(self, context: PlanContext) -> None:
        super().__init__(context)
        self.k = moves_per_epoch(self.layout, context.fraction)
        self._shift_epoch = 0
        self._shift = np.zeros(self.layout.min_size, dtype=np.int64)
        self.select = context.options.get("select", "random")
        if self.select not in SELECTIONS:
            raise ValueError(
                f"partial: unknown select {self.select!r}; choose one of {', '.join(SELECTIONS)}"
            )
        self.uses_losses = self.select == "importance"  # type: ignore[misc]
        self.unit, self.block = (
            context.options.get("unit", "sample"),
            int(context.options.get("block_size", 256)),
        )
        if self.unit not in UNITS:
            raise ValueError(f"partial: unknown unit {self.unit!r}; choose one of {', '.join(UNITS)}")
        if self.unit == "block":
            if self.block < 1 or self.uses_losses:
                raise ValueError("partial with unit='block' needs block_size >= 1 and select='random'")
            blocks = self.layout.min_size // self.block  # whole blocks of columns; the rest never moves
            self.k = min(blocks, round(self.k / self.block) or (1 if self.k else 0)) * self.block
        self._latest = np.full(self.layout.num_samples, np.nan)  # select=importance: last loss per id
        self._weights: dict[int, NDArray[np.float64]] = {}  # move t -> losses known before epoch t
        self._tables: dict[int, NDArray[np.int64]] = {}  # epoch -> (M, floor(N/M)) ids by column
        self._arranged: dict[int, NDArray[np.int64]] = {}  # move t -> table with choices swapped in
        self._observed = -1

    def moves(self, epoch: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """The columns that move between ``epoch`` and ``epoch + 1`` and their rank shifts."""
        rng = streams.rng(self.context.seed, streams.Stream.PARTIAL, epoch)
        if self.unit == "block":  # runs of block_size columns move together, each with one shift
            count = self.k // self.block
            first = rng.choice(self.layout.min_size // self.block, size=count, replace=False) * self.block
            columns = (first[:, None] + np.arange(self.block)[None, :]).reshape(-1)
            shifts = np.repeat(rng.integers(1, self.layout.world_size, size=count), self.block)
            return columns.astype(np.int64), shifts.astype(np.int64)
        columns = rng.choice(self.layout.min_size, size=self.k, replace=False)
        shifts = rng.integers(1, self.layout.world_size, size=self.k)
        return columns.astype(np.int64), shifts.astype(np.int64)

    def column_shift(self, epoch: int) -> NDArray[np.int64]:
        """``S_epoch``: how many ranks forward each column has moved since epoch 0 (mod M)."""
        if epoch < self._shift_epoch:
            self._shift_epoch, self._shift = 0, np.zeros_like(self._shift)
        shift = self._shift.copy()
        for t in range(self._shift_epoch, epoch):
            columns, shifts = self.moves(t)
            shift[columns] = (shift[columns] + shifts) % self.layout.world_size
        self._shift_epoch, self._shift = epoch, shift
        return shift

    def _held(self, epoch: int, ranks: NDArray[np.int64], columns: NDArray[np.int64]) -> NDArray[np.int64]:
        """Id in column ``columns[i]`` of rank ``ranks[i]`` at ``epoch``."""
        if self.uses_losses:
            return self._table(epoch)[ranks, columns]
        origin = (ranks - self.column_shift(epoch)[columns]) % self.layout.world_size
        return self.context.partition.lookup(origin, columns)

    # ---- select="importance": the whole slot table, advanced one move at a time

    def _table(self, epoch: int) -> NDArray[np.int64]:
        if epoch in self._tables:
            return self._tables[epoch]
        if epoch == 0:
            world, columns = self.layout.world_size, self.layout.min_size
            ranks = np.repeat(np.arange(world, dtype=np.int64), columns)
            slots = np.tile(np.arange(columns, dtype=np.int64), world)
            return self._keep(0, self.context.partition.lookup(ranks, slots).reshape(world, columns))
        earlier = [e for e in self._tables if e < epoch]
        if not earlier and self._tables:
            raise ValueError(
                f"partial(select='importance') plans epoch {epoch} from the holdings of the epochs before "
                f"it, which are no longer kept (kept: {sorted(self._tables)}); plan recent epochs, or "
                f"load the state saved near epoch {epoch}"
            )
        current = max(earlier) if earlier else 0
        table = self._table(current)
        for move in range(current, epoch):
            table = self._keep(move + 1, self._advance(move))
        return table

    def _keep(self, epoch: int, table: NDArray[np.int64]) -> NDArray[np.int64]:
        table.flags.writeable = False
        self._tables[epoch] = table
        for old in sorted(self._tables)[:-3]:
            del self._tables[old]
            self._arranged.pop(old, None)
        return table

    def _arrange(self, move: int) -> NDArray[np.int64]:
        """Epoch ``move``'s table with each rank's importance-weighted choices in the moving columns."""
        if move in self._arranged:
            return self._arranged[move]
        table = self._table(move)
        columns, _ = self.moves(move)
        weights = self._move_weights(move)
        arranged = table.copy()
        for rank in range(self.layout.world_size):
            row = table[rank]
            rng = streams.rng(self.context.seed, streams.Stream.IMPORTANCE, move, rank)
            chosen = weighted_choice(weights[row], self.k, rng)
            into = np.setdiff1d(columns, chosen)  # moving columns that hold a sample staying here
            out = np.setdiff1d(chosen, columns)  # chosen samples outside the moving columns
            arranged[rank, into], arranged[rank, out] = row[out], row[into]
        arranged.flags.writeable = False
        self._arranged[move] = arranged
        return arranged

    def _advance(self, move: int) -> NDArray[np.int64]:
        arranged = self._arrange(move)
        columns, shifts = self.moves(move)
        table = arranged.copy()
        sources = (np.arange(self.layout.world_size)[:, None] - shifts[None, :]) % self.layout.world_size
        table[:, columns] = arranged[sources, columns[None, :]]
        return table

    def _move_weights(self, move: int) -> NDArray[np.float64]:
        if move == 0:
            return np.ones(self.layout.num_samples)
        if move not in self._weights:
            raise ValueError(
                f"partial(select='importance'): the samples sent after epoch {move} are weighted by the "
                f"losses observed up to epoch {move - 1}, which have not been observed (call "
                f"planner.observe() after each epoch, or load the state saved with them)"
            )
        return self._weights[move]

    def observe(self, epoch: int, ids: NDArray[np.int64], losses: NDArray[np.floating]) -> None:
        """select='importance': remember each sample's latest loss; it weights the move after epoch
        ``epoch + 1``."""
        if not self.uses_losses:
            return
        if epoch <= self._observed:
            raise ValueError(
                f"partial: losses of epoch {epoch} arrive after those of epoch {self._observed}; "
                "observe each epoch once, in order"
            )
        values = np.asarray(losses, dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"epoch {epoch}: {int(np.sum(~np.isfinite(values)))} losses are not finite")
        self._observed = epoch
        self._latest[ids] = values
        seen = np.isfinite(self._latest)
        weights = np.where(seen, self._latest, self._latest[seen].mean() if seen.any() else 1.0)
        self._weights[epoch + 1] = weights
        for old in sorted(self._weights)[:-2]:
            del self._weights[old]

    def state_dict(self) -> dict[str, Any]:
        if not self.uses_losses:
            return {}
        return {
            "observed": self._observed,
            "latest": self._latest,
            "weights": {str(t): w for t, w in self._weights.items()},
            "tables": {str(e): t for e, t in self._tables.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not self.uses_losses:
            super().load_state_dict(state)
            return
        if not state:
            return
        self._observed = int(state["observed"])
        self._latest = np.asarray(state["latest"], dtype=np.float64).copy()
        self._weights = {int(t): np.asarray(w, dtype=np.float64) for t, w in state["weights"].items()}
        self._tables = {}
        for epoch, table in state["tables"].items():
            array = np.asarray(table, dtype=np.int64).copy()
            array.flags.writeable = False
            self._tables[int(epoch)] = array
        self._arranged = {}

    def slots(self, epoch: int, rank: int) -> NDArray[np.int64]:
        columns = np.arange(self.layout.min_size, dtype=np.int64)
        ids = self._held(epoch, np.full_like(columns, rank), columns)
        if self.layout.size(rank) > self.layout.min_size:  # the extra slot never moves
            extra = self.context.partition.lookup(np.array([rank]), np.array([self.layout.min_size]))
            ids = np.concatenate([ids, extra])
        return ids

    def locate(self, epoch: int, ids: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        if self.uses_losses:
            return super().locate(epoch, ids)
        origin, slots = self.context.partition.locate(ids)
        moving = slots < self.layout.min_size  # the extra slot never moves
        ranks = origin.copy()
        ranks[moving] = (origin[moving] + self.column_shift(epoch)[slots[moving]]) % self.layout.world_size
        return ranks, slots

    def sends(self, epoch: int, rank: int) -> dict[int, NDArray[np.int64]]:
        columns, shifts = self.moves(epoch)
        if self.uses_losses:
            ids = self._arrange(epoch)[rank, columns]
        else:
            ids = self._held(epoch, np.full_like(columns, rank), columns)
        return group_by_rank(ids, (rank + shifts) % self.layout.world_size)

    def receives(self, epoch: int, rank: int) -> dict[int, NDArray[np.int64]]:
        columns, shifts = self.moves(epoch)
        sources = (rank - shifts) % self.layout.world_size
        if self.uses_losses:
            return group_by_rank(self._arrange(epoch)[sources, columns], sources)
        return group_by_rank(self._held(epoch, sources, columns), sources)

    @classmethod
    def expected_churn(cls, layout: Layout, fraction: float) -> float:
        # k of n_r slots are new on every rank; averaged over the ceil- and floor-sized ranks.
        sizes = np.diff(layout.offsets)
        return float(np.mean(moves_per_epoch(layout, fraction) / sizes))
