"""The sample exchange: a plan's sends and receives, as bytes over ``torch.distributed``.

Per epoch boundary ``e -> e+1`` every rank:

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
import queue
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from numpy.typing import NDArray

from reshuffle.errors import ReshuffleError
from reshuffle.plan import ShufflePlanner
from reshuffle.store import format as fmt
from reshuffle.store.rank_store import MAX_PACK_BYTES, PackWriter, RankStore

HEADER = fmt.WIRE_HEADER.itemsize
MIN_PEER_CHUNK = 1 << 16
MAX_SAMPLE_BYTES = 1 << 30


class ExchangeError(ReshuffleError, RuntimeError):
    """An exchange failed; the committed state of every store is unchanged."""


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

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def new_exchange_group(timeout_s: float) -> dist.ProcessGroup:
    """A process group for exchanges (collective: every rank calls it, in the same order)."""
    return dist.new_group(timeout=datetime.timedelta(seconds=timeout_s))


class _Outgoing:
    """The byte stream to one peer: header block, then payloads, cut into chunks on demand."""

    def __init__(self, store: RankStore, ids: NDArray[np.int64]) -> None:
        self.records = store.records[store.position(ids)]
        headers = np.zeros(ids.size, dtype=fmt.WIRE_HEADER)
        for field in ("id", "label", "length", "crc"):
            headers[field] = self.records[field]
        headers["magic"] = fmt.WIRE_MAGIC
        self.size = headers.nbytes + int(self.records["length"].sum())
        self.payload_bytes = int(self.records["length"].sum())
        self._pieces = self._generate(store, headers.tobytes())
        self._pending: memoryview | None = None

    def _generate(self, store: RankStore, header_block: bytes) -> Iterator[memoryview]:
        yield memoryview(header_block)
        for record in self.records:
            yield store.record_bytes(record)

    def take(self, count: int, out: memoryview) -> None:
        """Copy the next ``count`` bytes of the stream into ``out``."""
        filled = 0
        while filled < count:
            piece = self._pending if self._pending is not None else next(self._pieces)
            used = min(len(piece), count - filled)
            out[filled : filled + used] = piece[:used]
            self._pending = piece[used:] if used < len(piece) else None
            filled += used


class _Incoming:
    """The byte stream from one peer, validated against the plan and written to a pack."""

    def __init__(
        self, source: int, expected: NDArray[np.int64], size: int, num_classes: int, writer: PackWriter
    ) -> None:
        self.source = source
        self.expected = expected
        self.size = size
        self.num_classes = num_classes
        self.writer = writer
        self.header_bytes = expected.size * HEADER
        if not self.header_bytes <= size <= self.header_bytes + expected.size * MAX_SAMPLE_BYTES:
            raise ExchangeError(
                f"rank {source} announced {size} bytes for {expected.size} samples; the stream is malformed"
            )
        self._headers = bytearray()
        self.headers: np.ndarray | None = None
        self._next = 0  # index of the record being received
        self._partial = bytearray()
        self.received = 0

    def feed(self, data: memoryview) -> None:
        self.received += len(data)
        if self.headers is None:
            need = self.header_bytes - len(self._headers)
            self._headers += data[:need]
            data = data[need:]
            if len(self._headers) == self.header_bytes:
                self.headers = self._check_headers(np.frombuffer(bytes(self._headers), dtype=fmt.WIRE_HEADER))
        while len(data):
            record = self.headers[self._next]
            length = int(record["length"])
            if not self._partial and len(data) >= length:
                payload, data = data[:length], data[length:]
            else:
                take = length - len(self._partial)
                self._partial += data[:take]
                data = data[take:]
                if len(self._partial) < length:
                    return
                payload, self._partial = memoryview(bytes(self._partial)), bytearray()
            crc = zlib.crc32(payload)
            if crc != int(record["crc"]):
                raise ExchangeError(
                    f"sample {int(record['id'])} from rank {self.source} arrived corrupt (crc mismatch)"
                )
            self.writer.append(int(record["id"]), int(record["label"]), payload, crc)
            self._next += 1

    def _check_headers(self, headers: np.ndarray) -> np.ndarray:
        where = f"from rank {self.source}"
        if np.any(headers["magic"] != fmt.WIRE_MAGIC):
            raise ExchangeError(f"malformed sample headers {where} (bad magic)")
        if not np.array_equal(np.sort(headers["id"]), self.expected):
            raise ExchangeError(f"rank {self.source} sent ids the plan does not send to this rank")
        if np.any(headers["label"] < 0) or np.any(headers["label"] >= self.num_classes):
            raise ExchangeError(f"labels outside 0..{self.num_classes - 1} {where}")
        lengths = headers["length"].astype(np.uint64)
        if np.any(lengths > MAX_SAMPLE_BYTES) or int(lengths.sum()) != self.size - self.header_bytes:
            raise ExchangeError(f"sample lengths {where} do not add up to the announced {self.size} bytes")
        return headers

    def finish(self) -> None:
        if self.received != self.size or self._next != self.expected.size or self._partial:
            raise ExchangeError(
                f"the stream from rank {self.source} ended early ({self.received} of {self.size} bytes)"
            )


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
        self._round_buffers: dict[str, list[torch.Tensor]] = {}
        self._thread: threading.Thread | None = None
        self._upkeep: _Background | None = None
        self._stats: ExchangeStats | None = None
        self._error: BaseException | None = None
        self._started = 0.0

    # ----------------------------------------------------------------- one boundary

    def start(self, epoch: int) -> None:
        """Begin exchanging ``epoch -> epoch + 1`` in the background."""
        if self._thread is not None:
            raise ExchangeError("an exchange is already running; wait() for it first")
        if self.store.epoch != epoch:
            raise ExchangeError(f"rank {self.rank}'s store is at epoch {self.store.epoch}, not {epoch}")
        self._stats, self._error = ExchangeStats(epoch=epoch), None
        self._started = time.perf_counter()
        self._thread = threading.Thread(
            target=self._background, args=(epoch,), name=f"exchange-{epoch}", daemon=True
        )
        self._thread.start()

    def wait(self) -> ExchangeStats:
        """Block until this rank's exchange is prepared; the blocked time is ``exposed_seconds``."""
        if self._thread is None:
            raise ExchangeError("no exchange is running")
        started = time.perf_counter()
        self._thread.join(self.timeout_s + 30)
        hung = self._thread.is_alive()
        self._thread = None
        if hung:
            raise ExchangeError(
                f"rank {self.rank}: the exchange did not finish within {self.timeout_s} s (a peer hung)"
            )
        if self._error is not None:
            raise self._error
        assert self._stats is not None
        self._stats.exposed_seconds = time.perf_counter() - started
        return self._stats

    def agree(self) -> None:
        """Collective: returns once every rank has prepared; raises on every rank otherwise."""
        prepared = self.store.prepared_epoch() == self.store.epoch + 1
        flag = torch.tensor([1 if prepared else 0], dtype=torch.int64, device=self.device)
        self._collective(
            "agreeing on the commit", lambda: dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        )
        if int(flag.item()) != 1:
            raise ExchangeError(
                f"rank {self.rank}: another rank failed to prepare epoch {self.store.epoch + 1}"
            )

    def commit(self) -> None:
        """Barrier, then phase 2 on this rank. Then, in the background while the next epoch
        trains (:meth:`settle` waits for it): the space the sent samples occupied is freed (hole
        punching is slow on some file systems, and nothing reads dead ranges) and the next
        exchange's landing space is allocated, so that its arrivals copy bytes instead of
        allocating pages. Freed first, then reserved (for a partial exchange about what was freed)."""
        self._collective("the commit barrier", lambda: dist.barrier(group=self.group))
        self.on_phase("commit")
        self.store.commit()
        arrived = self._stats.bytes_received if self._stats is not None else 0
        self._upkeep = _Background(lambda: self._after_commit(arrived))

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
        return time.perf_counter() - started

    def exchange(self, epoch: int, before_commit: Callable[[], None] | None = None) -> ExchangeStats:
        """Start, wait, agree, run ``before_commit`` (e.g. a checkpoint), commit."""
        self.start(epoch)
        stats = self.wait()
        self.agree()
        if before_commit is not None:
            before_commit()
        self.commit()
        return stats

    # ----------------------------------------------------------------- recovery

    def synchronize(self, target_epoch: int) -> list[str]:
        """Collective, at job start: finish or undo an interrupted commit, then run exchanges
        until every store holds ``target_epoch``'s plan. Returns what was done."""
        prepared = self.store.prepared_epoch()
        ready = self.store.epoch == target_epoch or prepared == target_epoch
        flag = torch.tensor([1 if ready else 0], dtype=torch.int64, device=self.device)
        self._collective("recovery", lambda: dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group))
        actions = []
        if self.store.epoch == target_epoch - 1 and prepared == target_epoch and int(flag.item()) == 1:
            self.store.commit()
            actions.append(f"rank {self.rank}: rolled an interrupted commit forward to epoch {target_epoch}")
        elif prepared is not None:
            self.store.discard_prepared()
            actions.append(f"rank {self.rank}: discarded an uncommitted exchange into epoch {prepared}")
        removed = self.store.release_dead_space()["removed_files"]
        if removed:
            actions.append(f"rank {self.rank}: removed {removed} file(s) left by an interrupted exchange")
        epochs = torch.tensor([self.store.epoch, -self.store.epoch], dtype=torch.int64, device=self.device)
        self._collective("recovery", lambda: dist.all_reduce(epochs, op=dist.ReduceOp.MAX, group=self.group))
        newest, oldest = int(epochs[0]), -int(epochs[1])
        if newest != oldest:
            raise fmt.StoreError(
                f"the rank stores are at epochs {oldest}..{newest}; restage into an empty store_dir"
            )
        if oldest > target_epoch:
            raise fmt.StoreError(
                f"the stores are at epoch {oldest}, past the epoch {target_epoch} the job resumes at; they "
                "cannot go back: restage into an empty store_dir, or resume from a newer checkpoint"
            )
        for epoch in range(oldest, target_epoch):
            self.exchange(epoch)
            actions.append(f"rank {self.rank}: exchanged epoch {epoch} -> {epoch + 1} to catch up")
        check_holdings(self.store, self.planner)
        return actions

    # ----------------------------------------------------------------- the work

    def _collective(self, what: str, operation: Callable[[], object]) -> None:
        try:
            operation()
        except RuntimeError as error:
            raise ExchangeError(
                f"rank {self.rank}: {what} failed after an exchange of epoch {self.store.epoch} ({error}); "
                "a peer rank died or hung. No committed data changed: restart the job to resume"
            ) from error

    def _background(self, epoch: int) -> None:
        writer = None
        try:
            assert self._stats is not None
            self._stats.upkeep_seconds = self.settle()
            writer = self.store.pack_writer(self.max_pack_bytes, reserved=True)
            self._run(epoch, writer, self._stats)
        except BaseException as error:  # reported to the caller of wait()
            if writer is not None:
                writer.abort()
            if not isinstance(error, ExchangeError | fmt.StoreError):
                error = ExchangeError(
                    f"rank {self.rank}: the exchange into epoch {epoch + 1} failed ({error}); "
                    "a peer rank may "
                    "have died or hung. No committed data changed: restart the job to resume"
                )
            self._error = error

    def _run(self, epoch: int, writer: PackWriter, stats: ExchangeStats) -> None:
        world = self.planner.world_size
        plan = self.planner.plan(epoch)
        sends, receives = plan.sends(self.rank), plan.receives(self.rank)
        outgoing = {dst: _Outgoing(self.store, ids) for dst, ids in sends.items()}
        self.on_phase("counts")
        send_sizes = torch.zeros(world, dtype=torch.int64)
        for dst, stream in outgoing.items():
            send_sizes[dst] = stream.size
        recv_sizes = torch.zeros(world, dtype=torch.int64, device=self.device)
        dist.all_to_all_single(recv_sizes, send_sizes.to(self.device), group=self.group)
        recv_sizes = recv_sizes.cpu()
        unexpected = [src for src in range(world) if src not in receives and int(recv_sizes[src])]
        if unexpected:
            raise ExchangeError(
                f"rank(s) {unexpected} announced data the plan does not send to rank {self.rank}"
            )
        incoming = {
            src: _Incoming(src, ids, int(recv_sizes[src]), self.store.meta.num_classes, writer)
            for src, ids in receives.items()
        }
        largest = max(int(send_sizes.max()), int(recv_sizes.max()))
        rounds = torch.tensor([-(-largest // self.peer_chunk)], dtype=torch.int64, device=self.device)
        dist.all_reduce(rounds, op=dist.ReduceOp.MAX, group=self.group)
        stats.rounds = int(rounds.item())
        self._payload(stats.rounds, send_sizes.tolist(), recv_sizes.tolist(), outgoing, incoming, writer)
        for stream in incoming.values():
            stream.finish()
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
        stats.wire_bytes_sent = int(send_sizes.sum())
        stats.wire_bytes_received = int(recv_sizes.sum())
        stats.seconds = time.perf_counter() - self._started

    def _buffers(self, kind: str, size: int) -> list[torch.Tensor]:
        """Two round buffers of at least ``size`` bytes, kept across exchanges: fresh memory would
        page-fault during every transfer. At most 2 x 2 x ``chunk_bytes`` per rank."""
        buffers = self._round_buffers.get(kind)
        if buffers is None or buffers[0].numel() < size:
            buffers = [torch.zeros(size, dtype=torch.uint8) for _ in range(2)]  # zeros: touched now
            self._round_buffers[kind] = buffers
        return buffers

    def _payload(
        self,
        rounds: int,
        send_sizes: list[int],
        recv_sizes: list[int],
        outgoing: dict[int, _Outgoing],
        incoming: dict[int, _Incoming],
        writer: PackWriter,
    ) -> None:
        """The payload rounds, pipelined: while round i+1 is on the wire, a sink thread checks
        and writes round i (crc32, pack writes and fdatasync release the GIL)."""

        def splits(sizes: list[int], index: int) -> list[int]:
            # Each stream spread evenly over the rounds (at most peer_chunk each): no short tail
            # round that would wait for a receive buffer while the sink lands the one before.
            return [size // rounds + (index < size % rounds) for size in sizes]

        if rounds == 0:
            return
        send_buffers = self._buffers("send", sum(splits(send_sizes, 0)))
        receive_buffers = self._buffers("receive", sum(splits(recv_sizes, 0)))

        def fill(index: int) -> int:
            view, cursor = memoryview(send_buffers[index % 2].numpy()), 0
            for dst, size in enumerate(splits(send_sizes, index)):
                if size:
                    outgoing[dst].take(size, view[cursor : cursor + size])
                    cursor += size
            return cursor

        sink = _Sink(incoming, writer)
        try:
            filled = fill(0)
            for index in range(rounds):
                in_splits, out_splits = splits(send_sizes, index), splits(recv_sizes, index)
                send = send_buffers[index % 2][:filled]
                received = sink.acquire(index % 2, receive_buffers)[: sum(out_splits)]
                if self.device.type == "cpu":
                    work = dist.all_to_all_single(
                        received, send, out_splits, in_splits, group=self.group, async_op=True
                    )
                else:
                    device_received = torch.empty(received.numel(), dtype=torch.uint8, device=self.device)
                    work = dist.all_to_all_single(
                        device_received,
                        send.to(self.device),
                        out_splits,
                        in_splits,
                        group=self.group,
                        async_op=True,
                    )
                # While this round is on the wire, copy the next one out of the store.
                filled = fill(index + 1) if index + 1 < rounds else 0
                work.wait()
                if self.device.type != "cpu":
                    received.copy_(device_received)
                sink.submit(index % 2, received, out_splits)
                self.on_phase("payload")
        finally:
            sink.close()


class _Background:
    """Run a function in a thread; ``join`` returns its result or raises its error."""

    def __init__(self, function: Callable[[], object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, args=(function,), daemon=True)
        self.thread.start()

    def _work(self, function: Callable[[], object]) -> None:
        try:
            self.result = function()
        except BaseException as error:  # handed to join()
            self.error = error

    def join(self) -> object:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result


class _Sink:
    """A thread that feeds received rounds to their streams, one buffer at a time."""

    def __init__(self, incoming: dict[int, _Incoming], writer: PackWriter) -> None:
        self.incoming = incoming
        self.writer = writer
        self.free = [threading.Event(), threading.Event()]
        for event in self.free:
            event.set()
        self.items: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="exchange-sink", daemon=True)
        self.thread.start()

    def acquire(self, slot: int, buffers: list[torch.Tensor]) -> torch.Tensor:
        """Buffer ``slot``, once the sink is done with what it held; re-raises a sink error."""
        self.free[slot].wait()
        if self.error is not None:
            raise self.error
        self.free[slot].clear()
        return buffers[slot]

    def submit(self, slot: int, received: torch.Tensor, splits: list[int]) -> None:
        self.items.put((slot, received, splits))

    def _work(self) -> None:
        while (item := self.items.get()) is not None:
            slot, received, splits = item
            try:
                if self.error is None:
                    data, cursor = memoryview(received.numpy()), 0
                    for src, size in enumerate(splits):
                        if size:
                            self.incoming[src].feed(data[cursor : cursor + size])
                            cursor += size
                    self.writer.sync()
            except BaseException as error:  # handed to the exchange thread
                self.error = error
            finally:
                self.free[slot].set()

    def close(self) -> None:
        self.items.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def check_holdings(store: RankStore, planner: ShufflePlanner) -> None:
    """Raise StoreError unless the store holds exactly the plan's holdings at its epoch."""
    expected = planner.plan(store.epoch).holdings(store.rank)
    if not np.array_equal(store.ids, expected):
        extra = np.setdiff1d(store.ids, expected).size
        missing = np.setdiff1d(expected, store.ids).size
        raise fmt.StoreError(
            f"rank {store.rank}'s store at epoch {store.epoch} holds {extra} sample(s) "
            f"the plan does not give it and lacks {missing} it should hold; "
            "the store belongs to another plan or is damaged: restage it"
        )
