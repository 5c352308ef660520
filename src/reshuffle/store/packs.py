"""``PackWriter``: appends samples to new, immutable pack files and records where each one went."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from reshuffle.store import format as fmt
from reshuffle.store.background import Background
from reshuffle.store.checksum import DEFAULT, checksum

MAX_PACK_BYTES = 256 << 20  # a pack rolls over beyond this, so compaction rewrites bounded files


class PackWriter:
    """Appends samples to new pack files (rolling over at ``max_bytes``) and records where."""

    def __init__(
        self,
        directory: Path,
        first_sequence: int,
        max_bytes: int = MAX_PACK_BYTES,
        reserve: Path | None = None,
        root: Path | None = None,
        checksum_name: str = DEFAULT,
        stride: int = 1,
    ) -> None:
        self.directory = directory
        # a new pack's sequence is the last one's + stride (writers in several processes, each
        # starting at its own first_sequence, never pick the same)
        self.stride = stride
        self.checksum_name = checksum_name  # the store's (StoreMeta.checksum)
        self.checksum = checksum(checksum_name)
        self.root = root or directory  # no file is written outside it (the rank's store directory)
        self.max_bytes = max_bytes
        self._sequence = first_sequence
        self._handle: Any = None
        self._written = 0
        self._reserve = reserve  # preallocated file that becomes the first pack, if it exists
        self._reserved = False  # the open pack came from it (its tail is cut at the end)
        self._records: list[tuple[int, int, int, int, int, int]] = []
        self._handed = 0  # records already returned by flush_records
        self.sequences: list[int] = []
        self._syncing: list[Background] = []  # fsyncs of full packs, running

    def append(self, sample_id: int, label: int, payload: bytes | memoryview, crc: int | None = None) -> None:
        """Write one sample; ``crc``: its checksum in this store's kind, when the caller has it."""
        if self._handle is None or (self._written and self._written + len(payload) > self.max_bytes):
            self._roll()
        crc = self.checksum(payload) if crc is None else crc
        self._handle.write(payload)
        self._records.append((sample_id, label, self._written, len(payload), self._sequence, crc))
        self._written += len(payload)

    def sync(self) -> None:
        """Push what was written so far to disk, so the final fsync has little left to do."""
        if self._handle is not None:
            self._handle.flush()
            os.fdatasync(self._handle.fileno())

    def flush_records(self) -> np.ndarray:
        """Everything appended so far in its pack files (not yet durable: :meth:`close`, or an
        fsync of each pack, makes it so); the records appended since the last call."""
        if self._handle is not None:
            self._handle.flush()
        records, self._handed = self._records[self._handed :], len(self._records)
        return np.array(records, dtype=fmt.RECORD)

    def _roll(self) -> None:
        self._finish_file(wait=False)
        if self._handle is not None or self.sequences:
            self._sequence += self.stride
        path = self.directory / fmt.pack_name(self._sequence)
        reserve, self._reserve = self._reserve, None
        self._reserved = reserve is not None and reserve.is_file()
        if reserve is not None and self._reserved:
            os.replace(reserve, path)  # its blocks are allocated: writes only copy bytes
        flags = os.O_RDWR if self._reserved else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self._handle = os.fdopen(
            fmt.open_for_writing(path, flags, self.root), "r+b" if self._reserved else "wb"
        )
        self.sequences.append(self._sequence)
        self._written = 0

    def _finish_file(self, wait: bool = True) -> None:
        """Flush the open pack and fsync it: a full pack in the background (the disk writes it
        back while the next one fills), the last one before :meth:`close` returns."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            handle.flush()
            if self._reserved:
                handle.truncate(self._written)  # the reserved blocks not used
            syncing = Background(lambda: _fsync_and_close(handle))
            self._syncing.append(syncing)
            if wait:
                self._join_syncs()

    def _join_syncs(self) -> None:
        syncing, self._syncing = self._syncing, []
        for each in syncing:
            each.join()  # raises a failed fsync's error (a full disk), after all have ended

    def close(self) -> np.ndarray:
        """Fsync everything written; the records, in the order appended."""
        self._finish_file()
        self._join_syncs()
        if self.sequences:
            fmt.fsync_path(self.directory)
        return np.array(self._records, dtype=fmt.RECORD)  # tuples are in RECORD's field order

    def abort(self) -> None:
        """Close and delete what was written (an exchange that failed)."""
        handle, self._handle = self._handle, None
        with contextlib.suppress(OSError):  # closing writes what was buffered: the disk may be full
            if handle is not None:
                handle.close()
        with contextlib.suppress(OSError):
            self._join_syncs()
        for sequence in self.sequences:
            (self.directory / fmt.pack_name(sequence)).unlink(missing_ok=True)


def _fsync_and_close(handle: Any) -> None:
    try:
        os.fsync(handle.fileno())
    finally:
        handle.close()
