"""The sample exchange: a plan's sends and receives, as bytes over ``torch.distributed``.

Per epoch boundary ``e -> e+1`` every rank:

0. (the caller's thread) takes its sends and receives from the epoch's plan, so the planner is
   only ever used by one thread;
1. exchanges byte counts with every peer (one ``all_to_all_single`` of M int64) and agrees on the
   number of payload rounds (one ``all_reduce(MAX)``);
2. runs that many ``all_to_all_single`` rounds of at most ``chunk_bytes`` each: never one message
   per sample. The stream to each peer is a block of fixed-layout headers (id, label, length,
   crc32, magic; no pickle) followed by the payloads in the same order;
3. validates what arrives before using it: the header block must name exactly the ids the plan
   says this peer sends, with labels in range and lengths adding up to the announced count; each
   payload must match its crc32. Payloads stream into fsynced packs;
4. prepares the store's next state (phase 1). After every rank has (:meth:`Exchanger.agree`), the
   caller may checkpoint, then :meth:`Exchanger.commit` renames it into place (phase 2).

Steps 1-4 run in a background thread on a process group of their own, so they overlap the
current epoch's training without interleaving with DDP's gradient all-reduces.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.distributed as dist
from numpy.typing import NDArray

from reshuffle.plan import EpochPlan, ShufflePlanner
from reshuffle.store.background import Background
from reshuffle.store.collectives import gather_ints
from reshuffle.store.packs import MAX_PACK_BYTES, PackWriter
from reshuffle.store.rank_store import RankStore
from reshuffle.store.transfer import MIN_PEER_CHUNK, Rounds, exchange_streams
from reshuffle.store.wire import ExchangeError, OutgoingStream, PeerError, describe_failure


@dataclass
class ExchangeStats:
    """What one epoch boundary moved and cost, on this rank."""

    epoch: int  # the exchange prepared epoch + 1 from epoch
    samples_sent: int = 0
    samples_received: int = 0
    bytes_sent: int = 0  # sample bytes (what the plan moves: k * sample size)
    bytes_received: int = 0
    wire_bytes_sent: int = 0  # including the 32-byte headers
    wire_bytes_received: int = 0
    rounds: int = 0
    seconds: float = 0.0  # from the exchange's start until its state was prepared
    exposed_seconds: float = 0.0  # how long the caller waited for it at the epoch boundary
    # The upkeep the previous commit started in the background (freeing the space sent samples
    # left, allocating this exchange's landing space): off the exchange's path unless it waited.
    upkeep_seconds: float = 0.0


def new_exchange_group(timeout_s: float) -> dist.ProcessGroup:
    """A process group for exchanges (collective: every rank calls it, in the same order)."""
    return cast(dist.ProcessGroup, dist.new_group(timeout=datetime.timedelta(seconds=timeout_s)))


class Exchanger:
    """Runs one rank's side of every exchange of a planner, against one store.

    Args:
        store: this rank's store.
        planner: the plan the store follows (its world size is the group's).
        group: a process group of all ranks reserved for exchanges (:func:`new_exchange_group`).
        device: where collective buffers live: CPU for gloo, the rank's GPU for NCCL.
        chunk_bytes: at most this many bytes leave a rank per payload round.
        timeout_s: a peer that does not answer within this ends the exchange with an error.
        on_phase: called with each phase name as the exchange reaches it (``PHASES``); for
            progress reporting and the fault-injection tests.
    """

    PHASES = ("counts", "payload", "prepared", "commit")

    def __init__(
        self,
        store: RankStore,
        planner: ShufflePlanner,
        *,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str = "cpu",
        chunk_bytes: int = 64 << 20,
        timeout_s: float = 300.0,
        max_pack_bytes: int = MAX_PACK_BYTES,
        on_phase: Callable[[str], None] | None = None,
    ) -> None:
        if planner.world_size != store.meta.world_size:
            raise ExchangeError(
                f"planner world size {planner.world_size} differs from the store's {store.meta.world_size}"
            )
        self.store = store
        self.planner = planner
        self.rank = store.rank
        self.group = group
        self.device = torch.device(device)
        self.peer_chunk = max(MIN_PEER_CHUNK, chunk_bytes // planner.world_size)
        self.timeout_s = timeout_s
        self.max_pack_bytes = max_pack_bytes
        self.on_phase = on_phase or (lambda phase: None)
        self._rounds = Rounds(group, self.device)
        self._thread: threading.Thread | None = None
        self._upkeep: Background | None = None
        self._stats: ExchangeStats | None = None
        self._error: BaseException | None = None
        self._started = 0.0

    # ----------------------------------------------------------------- one boundary

    def start(self, epoch: int, plan: EpochPlan | None = None) -> None:
        """Begin exchanging ``epoch -> epoch + 1`` in the background. ``plan`` is ``epoch``'s plan
        when the caller has it already; its sends and receives are read here, in this thread."""
        if self._thread is not None:
            raise ExchangeError("an exchange is already running; wait() for it first")
        if self.store.epoch != epoch:
            raise ExchangeError(f"rank {self.rank}'s store is at epoch {self.store.epoch}, not {epoch}")
        plan = plan if plan is not None else self.planner.plan(epoch)
        if plan.epoch != epoch:
            raise ExchangeError(f"start({epoch}) was handed the plan of epoch {plan.epoch}")
        moves = (plan.sends(self.rank), plan.receives(self.rank))
        self._stats, self._error = ExchangeStats(epoch=epoch), None
        self._started = time.perf_counter()
        self._thread = threading.Thread(
            target=self._background, args=(epoch, *moves), name=f"exchange-{epoch}", daemon=True
        )
        self._thread.start()

    @property
    def running(self) -> bool:
        """Whether an exchange was started and not yet waited for."""
        return self._thread is not None

    def wait(self) -> ExchangeStats:
        """Block until this rank's exchange is prepared; the blocked time is ``exposed_seconds``."""
        if self._thread is None:
            raise ExchangeError("no exchange is running")
        started = time.perf_counter()
        self._thread.join(self.timeout_s + 30)
        hung = self._thread.is_alive()
        self._thread = None
        if hung:
            raise PeerError(
                f"rank {self.rank}: the exchange did not finish within {self.timeout_s} s (a peer hung)"
            )
        if self._error is not None:
            raise self._error
        assert self._stats is not None
        self._stats.exposed_seconds = time.perf_counter() - started
        return self._stats

    def agree(self) -> None:
        """Collective: returns once every rank has prepared the next epoch; raises on every rank
        otherwise."""
        prepared = self.store.prepared_epoch() == self.store.epoch + 1
        flag = torch.tensor([1 if prepared else 0], dtype=torch.int64, device=self.device)
        self._collective(
            "agreeing on the commit", lambda: dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        )
        if int(flag.item()) != 1:
            raise PeerError(f"rank {self.rank}: another rank failed to prepare epoch {self.store.epoch + 1}")

    def commit(self, reserve_next: bool = True) -> None:
        """Barrier, then phase 2 on this rank. Then, in the background while the next epoch
        trains (:meth:`settle` waits for it): the space the sent samples occupied is freed (hole
        punching is slow on some file systems, and nothing reads dead ranges) and, when another
        exchange follows (``reserve_next``), its landing space is allocated, so that its arrivals
        copy bytes instead of allocating pages; when none follows, a reserve left is removed.
        Freed first, then reserved (for a partial exchange about what was freed)."""
        self._collective("the commit barrier", lambda: dist.barrier(group=self.group))
        self.on_phase("commit")
        self.store.commit()
        arrived = self._stats.bytes_received if self._stats is not None and reserve_next else 0
        self._upkeep = Background(lambda: self._after_commit(arrived))

    def settle(self) -> float:
        """Wait for the background upkeep of the last commit; returns how long it ran (seconds).
        The next exchange does this first; a benchmark does it before timing something else."""
        upkeep, self._upkeep = self._upkeep, None
        return float(upkeep.join()) if upkeep is not None else 0.0  # type: ignore[arg-type]

    def _after_commit(self, arrived: int) -> float:
        """Free the dead ranges, then reserve what this exchange received: the best guess of the
        next one's arrivals that needs no plan (an importance plan waits for this epoch's losses).
        A wrong guess costs nothing but speed: the writer cuts the unused tail or appends."""
        started = time.perf_counter()
        self.store.punch_dead_ranges()
        if arrived:
            self.store.reserve(arrived)
        else:
            self.store.drop_reserve()
        return time.perf_counter() - started

    def exchange(
        self, epoch: int, before_commit: Callable[[], None] | None = None, plan: EpochPlan | None = None
    ) -> ExchangeStats:
        """Start, wait, agree, run ``before_commit`` (e.g. a checkpoint), commit."""
        self.start(epoch, plan)
        stats = self.wait()
        self.agree()
        if before_commit is not None:
            before_commit()
        self.commit()
        return stats

    def gather_ints(self, values: list[int], what: str) -> NDArray[np.int64]:
        """Every rank's ``values``, one row per rank, on the exchange's group; a failure names
        this rank, its store and ``what`` was being agreed."""
        table: list[NDArray[np.int64]] = []
        self._collective(what, lambda: table.append(gather_ints(values, self.device, self.group)))
        return table[0]

    # ----------------------------------------------------------------- the work

    def _collective(self, what: str, operation: Callable[[], object]) -> None:
        try:
            operation()
        except RuntimeError as error:
            raise describe_failure(error, self.rank, self.store.directory, what) from error

    def _background(
        self, epoch: int, sends: dict[int, NDArray[np.int64]], receives: dict[int, NDArray[np.int64]]
    ) -> None:
        writer = None
        try:
            assert self._stats is not None
            self._stats.upkeep_seconds = self.settle()
            writer = self.store.pack_writer(self.max_pack_bytes, reserved=True)
            self._run(epoch, sends, receives, writer, self._stats)
        except BaseException as error:  # reported to the caller of wait()
            if writer is not None:
                writer.abort()
            self._error = describe_failure(
                error, self.rank, self.store.directory, f"the exchange into epoch {epoch + 1}"
            )

    def _run(
        self,
        epoch: int,
        sends: dict[int, NDArray[np.int64]],
        receives: dict[int, NDArray[np.int64]],
        writer: PackWriter,
        stats: ExchangeStats,
    ) -> None:
        outgoing = {dst: OutgoingStream(self.store, ids) for dst, ids in sends.items()}
        self.on_phase("counts")
        stats.rounds, stats.wire_bytes_sent, stats.wire_bytes_received = exchange_streams(
            self._rounds, outgoing, receives, writer, self.store.meta.num_classes, self.peer_chunk,
            self.planner.world_size, self.device, self.group, lambda: self.on_phase("payload"),
        )  # fmt: skip
        removed = np.concatenate(list(sends.values())) if sends else np.empty(0, dtype=np.int64)
        added = writer.close()
        # Rewrite packs that this exchange leaves mostly dead, in the background as well.
        self.store.prepare(
            epoch + 1, removed, added, compact_into=self.store.pack_writer(self.max_pack_bytes)
        )
        self.on_phase("prepared")
        stats.samples_sent = int(removed.size)
        stats.samples_received = int(added.size)
        stats.bytes_sent = sum(stream.payload_bytes for stream in outgoing.values())
        stats.bytes_received = int(added["length"].sum()) if added.size else 0
        stats.seconds = time.perf_counter() - self._started
