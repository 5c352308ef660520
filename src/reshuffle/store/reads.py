"""Reading one rank's committed samples out of its packs, every byte checked.

:class:`PackReader` serves the samples of one committed state through read-only memory maps.
Every read checks that the sample lies inside its pack (a truncated or deleted pack is a
:class:`CorruptSampleError` naming the sample, the pack and the fix, never a crash). Bytes are
checked against the crc32 the index recorded when they were written: on every read that leaves
the rank (a sample sent to a peer, compaction, ``verify``), and for training reads by
:meth:`PackReader.scrub`, once per sample per epoch in a background thread (``Exchanger``), since
checking each training read costs 5 % of ``StoreDataset``'s item rate at 784-byte samples and
68 % at 64 KiB (``bench/exchange.py``; the scrub runs at 0.8-2.5 GB/s on a warm cache).
A damaged sample is always an error that names this rank's own disk, never a peer or the transfer.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from reshuffle.store import format as fmt


class CorruptSampleError(fmt.StoreError):
    """A sample on this rank's own disk is damaged (its pack is missing, truncated or altered)."""


class PackReader:
    """The samples of one committed index (``records``) of the store in ``directory``."""

    def __init__(
        self, directory: Path, rank: int, epoch: int, records: np.ndarray, verify: bool = False
    ) -> None:
        self.directory = directory
        self.rank = rank
        self.epoch = epoch
        self.verify = verify  # check every training read's crc32 too (else the scrub does)
        # contiguous copies of the hot fields: a read indexes these per sample
        self.ids = np.ascontiguousarray(records["id"])
        self.packs = records["pack"].astype(np.int64)
        self.offsets = records["offset"].astype(np.int64)
        self.lengths = records["length"].astype(np.int64)
        self.labels = records["label"].astype(np.int64)
        self.crcs = records["crc"].astype(np.int64)
        self._maps: dict[int, mmap.mmap | bytes] = {}
        self._rows: dict[tuple[int, int], tuple[np.ndarray, int]] = {}  # (pack, length) -> window, size
        uniform = self.lengths.size and self.lengths.min() == self.lengths.max()
        self._uniform_length = int(self.lengths[0]) if uniform else None  # every sample's, if equal
        self._one_pack = bool(self.packs.size) and self.packs.min() == self.packs.max()

    def _window(self, sequence: int, length: int, sample_id: int) -> tuple[np.ndarray, int]:
        """Pack ``sequence`` as a read-only (offsets, ``length``) view: row ``o`` is the bytes at
        ``o .. o + length``, so a batch is one fancy-index copy (kept for this state's life)."""
        data = np.frombuffer(self._maps.get(sequence) or self._map(sequence, sample_id), dtype=np.uint8)
        rows = np.lib.stride_tricks.as_strided(
            data, shape=(max(0, data.size - length + 1), length), strides=(1, 1), writeable=False
        )
        self._rows[(sequence, length)] = rows, data.size
        return rows, data.size

    def where(self, sample_id: int) -> int:
        where = int(self.ids.searchsorted(sample_id))
        if where >= self.ids.size or self.ids[where] != sample_id:
            raise KeyError(f"rank {self.rank} does not hold sample {sample_id} at epoch {self.epoch}")
        return where

    def sample(self, where: int) -> tuple[memoryview | bytes, int]:
        """``(bytes, label)`` of the record at position ``where`` (crc checked if :attr:`verify`)."""
        payload = self.record(int(self.packs[where]), int(self.offsets[where]), int(self.lengths[where]),
                              int(self.crcs[where]), int(self.ids[where]), self.verify)  # fmt: skip
        return payload, int(self.labels[where])

    def record(
        self, sequence: int, start: int, length: int, crc: int, sample_id: int, check: bool = True
    ) -> memoryview | bytes:
        data = self._maps.get(sequence) or self._map(sequence, sample_id)
        if start + length > len(data):
            raise self._damaged(sample_id, sequence, f"its pack is truncated ({len(data)} bytes, the sample "
                                f"ends at {start + length})")  # fmt: skip
        payload = memoryview(data)[start : start + length]
        if check and zlib.crc32(payload) != crc:
            raise self._damaged(sample_id, sequence, "its bytes do not match their checksum")
        return payload

    def samples(self, where: NDArray[np.int64]) -> tuple[NDArray[np.uint8], NDArray[np.int64]] | None:
        """``(bytes, labels)`` at positions ``where`` as a (B, L) uint8 array gathered from the
        mapped packs in one vectorised step per pack, when all B samples are L bytes long;
        ``None`` when their lengths differ."""
        if where.size == 0:
            return None
        length = self._uniform_length
        if length is None:  # lengths differ in this state: this batch may still be uniform
            lengths = self.lengths[where]
            if np.any(lengths != lengths[0]):
                return None
            length = int(lengths[0])
        out = np.empty((where.size, length), dtype=np.uint8)
        packs, offsets = self.packs[where], self.offsets[where]
        single = self._one_pack or packs.min() == packs.max()
        for sequence in [int(packs[0])] if single else np.unique(packs).tolist():
            chosen = slice(None) if single else packs == sequence
            rows, size = self._rows.get((sequence, length)) or self._window(
                sequence, length, int(self.ids[where[chosen]][0])
            )
            if int(offsets[chosen].max()) >= rows.shape[0]:
                first = int(self.ids[where[chosen]][offsets[chosen] >= rows.shape[0]][0])
                raise self._damaged(first, sequence, f"its pack is truncated ({size} bytes)")
            out[chosen] = rows[offsets[chosen]]
        if self.verify:
            crcs = self.crcs[where]
            for row in range(where.size):
                if zlib.crc32(out[row]) != crcs[row]:
                    sample_id = int(self.ids[where[row]])
                    raise self._damaged(sample_id, int(packs[row]), "its bytes do not match their checksum")
        return out, self.labels[where]

    def scrub(self) -> list[int]:
        """Ids of the samples whose bytes do not match their crc32 (or lie beyond their pack),
        read in pack order: every sample of this state checked once."""
        damaged = []
        for where in np.lexsort((self.offsets, self.packs)).tolist():
            try:
                self.record(int(self.packs[where]), int(self.offsets[where]), int(self.lengths[where]),
                            int(self.crcs[where]), int(self.ids[where]))  # fmt: skip
            except CorruptSampleError:
                damaged.append(int(self.ids[where]))
        return damaged

    def damaged_error(self, damaged: list[int]) -> CorruptSampleError:
        shown = ", ".join(map(str, damaged[:10])) + (
            f" ... ({len(damaged)} in all)" if len(damaged) > 10 else ""
        )
        return CorruptSampleError(
            f"rank {self.rank}: sample(s) {shown} in this rank's own store (epoch {self.epoch}) do not match "
            "their checksums: its disk, not a peer or the transfer, holds bad bytes. `reshuffle verify "
            f"{self.directory.parent}` lists every damaged sample; restage the store (remove it and start "
            "the job again) to recover"
        )

    def _damaged(self, sample_id: int, sequence: int, why: str) -> CorruptSampleError:
        return CorruptSampleError(
            f"rank {self.rank}: sample {sample_id} in this rank's own store is damaged ({why}; "
            f"{self.directory / fmt.PACK_DIR / fmt.pack_name(sequence)}): its disk, not a peer or the "
            f"transfer, holds bad bytes. `reshuffle verify {self.directory.parent}` lists every damaged "
            "sample; restage the store (remove it and start the job again) to recover"
        )

    def _map(self, sequence: int, sample_id: int) -> mmap.mmap | bytes:
        # No lock: a DataLoader worker forked while another thread (the exchange, the scrub) held
        # one would wait on it forever. Two threads mapping the same pack at once keep the first
        # map (setdefault is atomic under the GIL); the other is unmapped when collected.
        path = fmt.inside(self.directory, f"{fmt.PACK_DIR}/{fmt.pack_name(sequence)}")
        try:
            handle = open(path, "rb")  # noqa: SIM115
        except FileNotFoundError:
            raise self._damaged(sample_id, sequence, "its pack is missing") from None
        with handle:
            size = os.fstat(handle.fileno()).st_size
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        return self._maps.setdefault(sequence, data)

    def close(self) -> None:
        self._rows = {}  # the window views hold the maps' buffers
        maps, self._maps = self._maps, {}
        for data in maps.values():
            if isinstance(data, mmap.mmap):
                with contextlib.suppress(BufferError):  # a view is still alive; GC unmaps it later
                    data.close()

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started with spawn get a copy without the open maps.
        state = self.__dict__.copy()
        state["_maps"], state["_rows"] = {}, {}
        return state
