"""``PackWriter``: appends samples to new, immutable pack files and records where each one went."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from reshuffle.store import format as fmt
from reshuffle.store.checksum import checksum

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
        checksum_name: str = "crc32c",
    ) -> None:
        self.directory = directory
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
        self.sequences: list[int] = []

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

    def _roll(self) -> None:
        self._finish_file()
        if self._handle is not None or self.sequences:
            self._sequence += 1
        path = self.directory / fmt.pack_name(self._sequence)
        reserve, self._reserve = self._reserve, None
        self._reserved = reserve is not None and reserve.is_file()
        if self._reserved:
            os.replace(reserve, path)  # its blocks are allocated: writes only copy bytes
        flags = os.O_RDWR if self._reserved else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self._handle = os.fdopen(
            fmt.open_for_writing(path, flags, self.root), "r+b" if self._reserved else "wb"
        )
        self.sequences.append(self._sequence)
        self._written = 0

    def _finish_file(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            if self._reserved:
                self._handle.truncate(self._written)  # the reserved blocks not used
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def close(self) -> np.ndarray:
        """Fsync everything written; the records, in the order appended."""
        self._finish_file()
        if self.sequences:
            fmt.fsync_dir(self.directory)
        return np.array(self._records, dtype=fmt.RECORD)  # tuples are in RECORD's field order

    def abort(self) -> None:
        """Close and delete what was written (an exchange that failed)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        for sequence in self.sequences:
            (self.directory / fmt.pack_name(sequence)).unlink(missing_ok=True)
