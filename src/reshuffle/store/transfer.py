"""The payload rounds of an exchange, pipelined: the next round is packed while this one is on
the wire, and a sink thread checks and lands the previous one.

Each round is one ``all_to_all_single`` of at most ``chunk_bytes`` per rank: never one message
per sample. The round buffers are kept across exchanges (fresh memory would page-fault during
every transfer).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from numpy.typing import NDArray

from reshuffle.store.packs import PackWriter
from reshuffle.store.wire import ExchangeError, IncomingStream, OutgoingStream

MIN_PEER_CHUNK = 1 << 16
PIPELINE_ROUNDS = 8  # rounds enough for packing, transfer and landing to overlap
MIN_ROUND_BYTES = 1 << 20  # per peer: below this a round's fixed cost outweighs the overlap


def rounds_for(largest: int, peer_chunk: int) -> int:
    """Payload rounds for a rank whose largest stream (to or from one peer) is ``largest`` bytes:
    at most ``peer_chunk`` per peer per round, and at least ``PIPELINE_ROUNDS`` where each round
    still moves ``MIN_ROUND_BYTES`` per peer, so that the pipeline (pack round r+1, transfer r,
    land r-1) fills: with one or two rounds its parts would run one after another."""
    by_memory = -(-largest // peer_chunk)
    return max(by_memory, min(PIPELINE_ROUNDS, largest // MIN_ROUND_BYTES))


class Rounds:
    """Runs payload rounds on ``group``; collective buffers live on ``device``."""

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device) -> None:
        self.group = group
        self.device = device
        self._kept: dict[str, list[torch.Tensor]] = {}

    def buffers(self, kind: str, size: int) -> list[torch.Tensor]:
        """Two round buffers of at least ``size`` bytes, kept across exchanges: fresh memory would
        page-fault during every transfer. At most 2 x 2 x ``chunk_bytes`` per rank."""
        buffers = self._kept.get(kind)
        if buffers is None or buffers[0].numel() < size:
            buffers = [torch.zeros(size, dtype=torch.uint8) for _ in range(2)]  # zeros: touched now
            self._kept[kind] = buffers
        return buffers

    def run(
        self,
        rounds: int,
        send_sizes: list[int],
        recv_sizes: list[int],
        outgoing: dict[int, OutgoingStream],
        incoming: dict[int, IncomingStream],
        writer: PackWriter | None,
        on_round: Callable[[], None],
    ) -> None:
        """The payload rounds, pipelined: while round i+1 is on the wire, a sink thread checks
        and writes round i (crc32, pack writes and fdatasync release the GIL)."""

        def splits(sizes: list[int], index: int) -> list[int]:
            # Each stream spread evenly over the rounds (at most peer_chunk each): no short tail
            # round that would wait for a receive buffer while the sink lands the one before.
            return [size // rounds + (index < size % rounds) for size in sizes]

        if rounds == 0:
            return
        send_buffers = self.buffers("send", sum(splits(send_sizes, 0)))
        receive_buffers = self.buffers("receive", sum(splits(recv_sizes, 0)))

        def fill(index: int) -> int:
            view, cursor = send_buffers[index % 2].numpy().data, 0
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
                assert work is not None  # async_op=True returns the work
                work.wait()
                if self.device.type != "cpu":
                    received.copy_(device_received)
                sink.submit(index % 2, received, out_splits)
                on_round()
        finally:
            sink.close()


class _Sink:
    """A thread that feeds received rounds to their streams, one buffer at a time."""

    def __init__(self, incoming: dict[int, IncomingStream], writer: PackWriter | None) -> None:
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
                    if self.writer is not None:  # None: this rank receives nothing
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


def exchange_streams(
    rounds: Rounds, outgoing: dict[int, Any], receives: dict[int, NDArray[np.int64]],
    writer: PackWriter | None, num_classes: int, peer_chunk: int, world: int, device: torch.device | None,
    group: dist.ProcessGroup | None, on_payload: Callable[[], None] = lambda: None,
) -> tuple[int, int, int]:  # fmt: skip
    """One exchange (collective): this rank sends its ``outgoing`` streams (any object with
    ``size`` and ``take``, e.g. :class:`OutgoingStream`) and lands the samples ``receives`` names
    (per source rank, sorted ids) through ``writer``: counts, then pipelined rounds, every arrival
    checked. Returns the rounds and the wire bytes this rank sent and received."""
    device = device or torch.device("cpu")
    send_sizes = torch.zeros(world, dtype=torch.int64)
    for dst, stream in outgoing.items():
        send_sizes[dst] = stream.size
    recv_sizes = torch.zeros(world, dtype=torch.int64, device=device)
    dist.all_to_all_single(recv_sizes, send_sizes.to(device), group=group)
    recv_sizes = recv_sizes.cpu()
    if unexpected := [src for src in range(world) if src not in receives and int(recv_sizes[src])]:
        raise ExchangeError(f"rank(s) {unexpected} announced data the plan does not send to this rank")
    incoming: dict[int, IncomingStream] = {}
    if receives:
        assert writer is not None  # a rank the plan sends to has a writer
        incoming = {
            src: IncomingStream(src, ids, int(recv_sizes[src]), num_classes, writer)
            for src, ids in receives.items()
        }
    largest = max(int(send_sizes.max()), int(recv_sizes.max()))
    count = torch.tensor([rounds_for(largest, peer_chunk)], dtype=torch.int64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
    rounds.run(int(count.item()), send_sizes.tolist(), recv_sizes.tolist(), outgoing, incoming, writer,
               on_payload)  # fmt: skip
    for stream in incoming.values():
        stream.finish()
    return int(count.item()), int(send_sizes.sum()), int(recv_sizes.sum())
