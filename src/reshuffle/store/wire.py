"""The byte streams of an exchange: one per (sender, receiver) pair, validated before use.

A stream is a block of fixed-layout headers (id, label, length, crc32, magic; no pickle), then
the payloads in the same order. The receiving side checks the headers against the plan (exactly
the ids this peer should send, labels in range, lengths adding up to the announced size) and
every payload against its crc32 before it lands in a pack.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from numpy.typing import NDArray

from reshuffle.errors import ReshuffleError
from reshuffle.store import format as fmt
from reshuffle.store.checksum import BY_MAGIC, WIRE_MAGIC, checksum
from reshuffle.store.packs import PackWriter
from reshuffle.store.rank_store import RankStore

HEADER = fmt.WIRE_HEADER.itemsize
MAX_SAMPLE_BYTES = 1 << 30


class ExchangeError(ReshuffleError, RuntimeError):
    """An exchange failed; the committed state of every store is unchanged."""


class PeerError(ExchangeError):
    """This rank failed because another rank did (died, hung, or failed first): not the cause.
    The launcher reports the rank whose error is not a ``PeerError`` as the one that failed."""


def describe_failure(error: BaseException, rank: int, directory: object, what: str) -> BaseException:
    """The error a rank reports when ``what`` (part of an exchange) raised ``error``: a full disk
    or a permission problem names its path and the fix (a restart alone fails the same way); a
    collective's error names the peer as the cause; reshuffle's own errors pass unchanged."""
    import errno

    if isinstance(error, ReshuffleError):
        return error
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return fmt.StoreError(
            f"rank {rank}: {what} failed: no space left on the disk holding {directory} "
            f"({error.filename or 'writing a pack'}). Free space there, or set shuffle.store_dir to a "
            "larger node-local disk, then restart the job (no committed data changed)"
        )
    if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return fmt.StoreError(
            f"rank {rank}: {what} failed: cannot write {error.filename or directory} ({error.strerror}). "
            f"Make {directory} writable by this user (or set shuffle.store_dir to a writable disk), "
            "then restart the job (no committed data changed)"
        )
    if isinstance(error, OSError):
        return fmt.StoreError(f"rank {rank}: {what} failed in {directory}: {error}")
    if isinstance(error, RuntimeError):  # torch.distributed: a peer closed, reset or timed out
        return PeerError(
            f"rank {rank}: {what} failed ({error}); a peer rank died or hung, or failed first. No committed "
            "data changed: once the cause is fixed, restart the job to resume"
        )
    return error


class OutgoingStream:
    """The byte stream to one peer: header block, then payloads, cut into chunks on demand."""

    def __init__(self, store: RankStore, ids: NDArray[np.int64]) -> None:
        self.records = store.records[store.position(ids)]
        headers = np.zeros(ids.size, dtype=fmt.WIRE_HEADER)
        for field in ("id", "label", "length", "crc"):
            headers[field] = self.records[field]
        headers["magic"] = WIRE_MAGIC[store.meta.checksum]  # the crc is the store's own
        self.size = headers.nbytes + int(self.records["length"].sum())
        self.payload_bytes = int(self.records["length"].sum())
        self._pieces = self._generate(store, headers.tobytes())
        self._pending: bytes | memoryview | None = None

    def _generate(self, store: RankStore, header_block: bytes) -> Iterator[bytes | memoryview]:
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


class SampleStream(OutgoingStream):
    """The byte stream to one peer of samples held in memory, ``(id, label, payload)`` in the
    order sent (staging from shards: a shard's reader forwards what other ranks hold)."""

    def __init__(self, samples: list[tuple[int, int, bytes]], checksum_name: str) -> None:
        headers = np.zeros(len(samples), dtype=fmt.WIRE_HEADER)
        function, magic = checksum(checksum_name), WIRE_MAGIC[checksum_name]
        for row, (sample_id, label, payload) in enumerate(samples):
            headers[row] = (sample_id, label, len(payload), function(payload), magic)
        self.payload_bytes = int(headers["length"].sum())
        self.size = headers.nbytes + self.payload_bytes
        self._pieces = iter([memoryview(headers.tobytes()), *(memoryview(p) for _, _, p in samples)])
        self._pending = None


class IncomingStream:
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
        self._checksum = writer.checksum  # set from the headers' magic once they arrive
        self._same_checksum = True

    def feed(self, data: memoryview) -> None:
        self.received += len(data)
        if self.headers is None:
            need = self.header_bytes - len(self._headers)
            self._headers += data[:need]
            data = data[need:]
            if len(self._headers) == self.header_bytes:
                self.headers = self._check_headers(np.frombuffer(bytes(self._headers), dtype=fmt.WIRE_HEADER))
        while len(data):
            assert self.headers is not None  # the header block comes first
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
            if self._checksum(payload) != int(record["crc"]):
                raise ExchangeError(
                    f"sample {int(record['id'])} from rank {self.source} arrived corrupt (checksum "
                    "mismatch); the sender checked it as it read it, so it changed in transfer"
                )
            crc = int(record["crc"]) if self._same_checksum else None  # else the writer's own
            self.writer.append(int(record["id"]), int(record["label"]), payload, crc)
            self._next += 1

    def _check_headers(self, headers: np.ndarray) -> np.ndarray:
        where = f"from rank {self.source}"
        kinds = np.unique(headers["magic"]).tolist()
        if any(kind not in BY_MAGIC for kind in kinds) or len(kinds) > 1:
            raise ExchangeError(f"malformed sample headers {where} (bad magic)")
        name = BY_MAGIC[kinds[0]] if kinds else self.writer.checksum_name  # how the sender checksummed
        self._checksum, self._same_checksum = checksum(name), name == self.writer.checksum_name
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
