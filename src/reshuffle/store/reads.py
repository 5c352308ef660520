"""Reading one rank's committed samples out of its packs, every sample checked on the read.

A store exists because the data does not fit the page cache, so a read fetches exactly the
sample's bytes: a positional read (``os.pread``) on a descriptor advised ``POSIX_FADV_RANDOM``, so
the kernel reads no neighbours that would be evicted before use (a memory map of the pack faults
in up to ``read_ahead_kb`` around each random read). A batch's reads are announced to the kernel
together (``POSIX_FADV_WILLNEED``) so the disk serves them side by side, and neighbours in a
batch are coalesced into one read. In a store bigger than the memory available, a batch of
records (:meth:`PackReader.many`) whose reads go to the disk is read around the page cache instead
(:mod:`reshuffle.store.direct`: ``O_DIRECT`` through ``io_uring``). Batches of equal-length
samples smaller than ``MAPPED_BELOW`` are gathered through a read-only memory map advised
``MADV_RANDOM`` instead (a page is the least any read fetches, and one vectorised copy gathers the
whole batch).

Every read checks that the sample lies inside its pack and that its bytes match the checksum the
index recorded when they were written (:mod:`reshuffle.store.checksum`), in the process that reads
it (a DataLoader worker), before it can be in a batch. A damaged sample raises
:class:`CorruptSampleError` naming it, and is recorded in the rank directory (``damaged.json``) so
that the job's process refuses to describe an epoch that met it (``ShuffledData.state_dict``) and
the next start refuses the store until it is restaged. It names this rank's own disk, never a
peer or the transfer.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from reshuffle.store import format as fmt
from reshuffle.store.announce import Ahead, Announcing
from reshuffle.store.checksum import LEGACY, MISMATCH, WORD, RowChecks, checksum, first_bad
from reshuffle.store.direct import PROBE, SPLIT_FROM, AroundPageCache, DirectReads, wanted

# Equal-length batches of samples below this many bytes are gathered from a memory map (a page
# holds several of them); larger ones are read with pread. Set between the two sizes measured
# (784 B and 110 KB, bench/exchange.py and bench/scale.py), not tuned in between.
MAPPED_BELOW = 16 << 10
# A read of n bytes that took longer than FROM_CACHE_WITHIN + n / FROM_CACHE_RATE seconds came from
# the disk: the page cache copies 4 GB/s or more on any machine a store runs on (8 GB/s measured
# here), a disk's random read takes 50 us or more before its first byte (NVMe: about 80 us).
FROM_CACHE_WITHIN = 50e-6
FROM_CACHE_RATE = 4e9
# The most buffers one positional read fills (a run of neighbours longer than this is read in parts).
IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX")) if hasattr(os, "sysconf") else 1024


def read_into(descriptor: int, buffers: list[memoryview], start: int) -> int:
    """Fill ``buffers`` one after the other with the file's bytes from ``start`` on, in one system
    call where there is ``os.preadv``; how many bytes were read (fewer at the end of the file)."""
    if hasattr(os, "preadv"):
        return os.preadv(descriptor, buffers, start)
    got = 0
    for buffer in buffers:
        data = os.pread(descriptor, len(buffer), start + got)
        buffer[: len(data)] = data
        got += len(data)
        if len(data) < len(buffer):
            break
    return got


class CorruptSampleError(fmt.StoreError):
    """A sample on this rank's own disk is damaged (its pack is missing, truncated or altered)."""


class PackReader(Announcing, AroundPageCache):
    """The samples of one committed index (``records``) of the store in ``directory``.

    Args:
        directory: the rank directory.
        rank, epoch: whose store and which committed state (for messages).
        records: the state's index (``format.RECORD``), sorted by id.
        checksum_name: the store's checksum (``StoreMeta.checksum``).
        sharing: how many ranks' stores of about this size share this machine's page cache (this
            one included): whether reads go around it is decided for their bytes together.
    """

    def __init__(
        self, directory: Path, rank: int, epoch: int, records: np.ndarray, checksum_name: str = LEGACY,
        *, sharing: int = 1,
    ) -> None:  # fmt: skip
        self.directory = directory
        self.rank = rank
        self.epoch = epoch
        self.checksum = checksum(checksum_name)
        # contiguous copies of the hot fields: a read indexes these per sample
        self.ids = np.ascontiguousarray(records["id"])
        self.packs = records["pack"].astype(np.int64)
        self.offsets = records["offset"].astype(np.int64)
        self.lengths = records["length"].astype(np.int64)
        self.labels = records["label"].astype(np.int64)
        self.crcs = records["crc"].astype(np.int64)
        self._files: dict[int, tuple[int, int]] = {}  # pack -> (descriptor, size)
        self._maps: dict[int, mmap.mmap | bytes] = {}
        self._rows: dict[tuple[int, int], tuple[np.ndarray, int]] = {}  # (pack, length) -> window, size
        uniform = self.lengths.size and self.lengths.min() == self.lengths.max()
        self._uniform_length = int(self.lengths[0]) if uniform else None  # every sample's, if equal
        self._one_pack = bool(self.packs.size) and self.packs.min() == self.packs.max()
        # a batch's rows checked at once (equal lengths), and the CRCs it folds (WORD)
        self._row_checks: tuple[RowChecks, NDArray[np.uint32]] | None = None
        self._from_cache = False  # every read of the last batch came from the page cache
        # whether the kernel says if a page is cached (a read that may not wait; Linux 4.14+)
        self._can_ask = hasattr(os, "RWF_NOWAIT") and hasattr(os, "preadv")
        self._byte = bytearray(1)
        # batches that go to the disk read around the page cache: stores bigger than memory
        self._direct = DirectReads(directory) if wanted(int(self.lengths.sum()) * sharing) else None

    @property
    def around_page_cache(self) -> bool:
        """Whether batches whose reads go to the disk are read around the page cache
        (:mod:`reshuffle.store.direct`): stores bigger than the memory available."""
        return self._direct is not None

    def where(self, sample_id: int) -> int:
        where = int(self.ids.searchsorted(sample_id))
        if where >= self.ids.size or self.ids[where] != sample_id:
            raise KeyError(f"rank {self.rank} does not hold sample {sample_id} at epoch {self.epoch}")
        return where

    # ----------------------------------------------------------------- reads

    def sample(self, where: int) -> tuple[bytes, int]:
        """``(bytes, label)`` of the record at position ``where``, checked."""
        payload = self.record(int(self.packs[where]), int(self.offsets[where]), int(self.lengths[where]),
                              int(self.crcs[where]), int(self.ids[where]))  # fmt: skip
        return payload, int(self.labels[where])

    def record(
        self, sequence: int, start: int, length: int, crc: int, sample_id: int, *, note_damage: bool = True
    ) -> bytes:
        """The ``length`` bytes at ``start`` of pack ``sequence``, checked against ``crc``
        (``note_damage=False``: a damaged sample is not recorded in ``damaged.json``)."""
        descriptor, size = self._file(sequence, sample_id)
        if start + length > size:
            raise self._truncated(sample_id, sequence, size, start + length)
        payload = os.pread(descriptor, length, start)
        if len(payload) != length:  # the pack shrank since it was opened
            raise self._truncated(sample_id, sequence, start + len(payload), start + length)
        if self.checksum(payload) != crc:
            raise self.damaged(sample_id, sequence, MISMATCH, note_damage)
        return payload

    def many(
        self,
        where: NDArray[np.int64],
        head_size: Callable[[bytes], int | None] | None = None,
        ahead: Ahead | None = None,
    ) -> Iterator[bytes | tuple[bytes, bytes]]:
        """The records at positions ``where``, each checked. Lazily: a caller that decodes each as
        it comes keeps one raw buffer alive at a time (a fresh buffer per sample costs page faults).

        The batch's reads are announced together (:meth:`_announce`) when they will go to the
        disk; from the page cache, announcing costs a system call per sample and gains nothing.
        Which it is, the kernel is asked where it can tell (:meth:`_in_page_cache`): for the
        batch's first record, and for the next one after any read that took longer than the page
        cache could (``FROM_CACHE_WITHIN``, ``FROM_CACHE_RATE``). A preempted worker's read is slow
        too, so the time alone does not decide (measured: it announced 70% of a warm epoch's
        samples with two workers on two cores). Where the kernel cannot tell, the time decides:
        the batch is announced unless the last one came from the page cache, and its second slow
        read announces the rest.

        With ``head_size`` (a decoder's: a record's first ``PROBE`` bytes -> how many of them come
        before its body, or None), a record of ``SPLIT_FROM`` bytes or more that has a body comes
        as ``(head, body)``: the body is read straight into its own ``bytes``, so a decoder can
        return it without copying it out of the record (the ImageNet case: a JPEG and its label).

        ``ahead``: gives the positions of the records the next batches will read (the plan's
        order), announced with this batch's when it goes to the disk, so the disk's queue does not
        run dry between one batch and the next; asked only then (finding them costs a batch of
        small cached samples a fifth of its time)."""
        announced = last_slow = False
        slow = 0  # reads that came from the disk (or were preempted)
        files, clock = self._files, time.perf_counter
        columns = (self.ids, self.packs, self.offsets, self.lengths, self.crcs)
        # one loop over plain ints: per sample, a method call costs as much as the checksum
        rows = zip(*(column[where].tolist() for column in columns), strict=True)
        for done, row in enumerate(rows):
            sample_id, sequence, start, length, crc = row
            descriptor, size = files.get(sequence) or self._file(sequence, sample_id)
            if start + length > size:
                raise self._truncated(sample_id, sequence, size, start + length)
            if not announced:
                cached = self._in_page_cache(descriptor, start, length) if done == 0 or last_slow else True
                if cached is None:  # the kernel cannot tell: the time decides
                    cached = self._from_cache if done == 0 else not (slow == 2 and last_slow)
                if not cached and self._direct is not None and self._direct.usable():
                    self._from_cache = False
                    yield from self._many_direct([row, *rows], head_size)
                    return
                if not cached:  # this batch's reads first: the disk queues them before the next ones'
                    self._announce(where[done:])
                    self._announce_ahead(ahead)
                    announced = True
            began = clock()
            record, got = self._read_buffered(descriptor, start, length, head_size)
            last_slow = clock() - began > FROM_CACHE_WITHIN + length / FROM_CACHE_RATE
            slow += last_slow
            self._from_cache = slow < 2
            self._verify(record, got, sample_id, sequence, start, length, crc)
            yield record

    def _read_buffered(
        self, descriptor: int, start: int, length: int, head_size: Callable[[bytes], int | None] | None
    ) -> tuple[bytes | tuple[bytes, bytes], int]:
        """One record read through the page cache, whole or as ``(head, body)`` (:meth:`many`);
        with the bytes read."""
        cut = None
        if head_size is not None and length >= SPLIT_FROM:
            head = os.pread(descriptor, PROBE, start)
            cut = head_size(head)
        if cut is not None and cut < length:  # else a damaged head: the whole read finds it
            head = head[:cut] if cut <= len(head) else os.pread(descriptor, cut, start)
            body = os.pread(descriptor, length - cut, start + cut)
            return (head, body), len(head) + len(body)
        record = os.pread(descriptor, length, start)
        return record, len(record)

    def samples(
        self, where: NDArray[np.int64], ahead: Ahead | None = None
    ) -> tuple[NDArray[np.uint8], NDArray[np.int64]] | None:
        """``(bytes, labels)`` at positions ``where`` as a (B, L) uint8 array, every row checked,
        when all B samples are L bytes long; ``None`` when their lengths differ. ``ahead``: as
        for :meth:`many`."""
        if where.size == 0:
            return None
        length = self._uniform_length
        if length is None:  # lengths differ in this state: this batch may still be uniform
            lengths = self.lengths[where]
            if np.any(lengths != lengths[0]):
                return None
            length = int(lengths[0])
        out = np.empty((where.size, length), dtype=np.uint8)
        if length >= MAPPED_BELOW:
            first = int(where[0])
            descriptor, _ = self._file(int(self.packs[first]), int(self.ids[first]))
            if self._in_page_cache(descriptor, int(self.offsets[first]), length) is not True:
                self._announce(where)
                self._announce_ahead(ahead)
            self._gather_read(where, length, out)  # checks each row as it lands
            return out, self.labels[where]
        self._gather_mapped(where, length, out)
        self._check_rows(where, out)
        return out, self.labels[where]

    def _check_rows(self, where: NDArray[np.int64], rows: NDArray[np.uint8]) -> None:
        """Check gathered rows: in one checksum call over the batch when every sample of the store
        is as long (:class:`~reshuffle.store.checksum.RowChecks`), else one call per row."""
        length = self._uniform_length
        if length is not None:
            if self._row_checks is None:
                self._row_checks = RowChecks(self.checksum, length), self.crcs.astype(WORD)
            checks, words = self._row_checks
            if checks.matches(rows, words[where]):
                return
        bad = first_bad(self.checksum, rows, self.crcs[where])
        if bad is not None:
            raise self._mismatch(where, bad)

    def _gather_read(self, where: NDArray[np.int64], length: int, out: NDArray[np.uint8]) -> None:
        """Rows of ``out`` read straight into them, a run of neighbours in a pack in one read
        (``os.preadv``), each run's rows checked as they land, while the CPU's cache holds them (a
        check after the whole batch would read it from memory again: a fifth of a 110 KB batch's
        time, measured)."""
        packs, offsets = self.packs[where], self.offsets[where]
        order = np.lexsort((offsets, packs))
        check, crcs = self.checksum, self.crcs[where].tolist()
        run_start = 0
        for index in range(1, order.size + 1):
            if index < order.size and index - run_start < IOV_MAX:
                prev, this = order[index - 1], order[index]
                if packs[this] == packs[prev] and offsets[this] == offsets[prev] + length:
                    continue
            run = order[run_start:index].tolist()
            sequence, start = int(packs[run[0]]), int(offsets[run[0]])
            descriptor, size = self._file(sequence, int(self.ids[where[run[0]]]))
            end = start + len(run) * length
            rows = [memoryview(out[row]) for row in run]
            got = read_into(descriptor, rows, start) if end <= size else 0
            if got != end - start:
                raise self._truncated(int(self.ids[where[run[0]]]), sequence, size, end)
            for row, landed in zip(run, rows, strict=True):
                if check(landed) != crcs[row]:
                    raise self._mismatch(where, row)
            run_start = index

    def _gather_mapped(self, where: NDArray[np.int64], length: int, out: NDArray[np.uint8]) -> None:
        """Rows of ``out`` gathered from the packs' maps, one vectorised copy per pack."""
        packs, offsets = self.packs[where], self.offsets[where]
        single = self._one_pack or packs.min() == packs.max()
        for sequence in [int(packs[0])] if single else np.unique(packs).tolist():
            chosen = slice(None) if single else packs == sequence
            rows, size = self._rows.get((sequence, length)) or self._window(
                sequence, length, int(self.ids[where[chosen]][0])
            )
            if int(offsets[chosen].max()) >= rows.shape[0]:
                first = int(self.ids[where[chosen]][offsets[chosen] >= rows.shape[0]][0])
                raise self._truncated(first, sequence, size, int(offsets[chosen].max()) + length)
            out[chosen] = rows[offsets[chosen]]

    # ----------------------------------------------------------------- errors

    def damaged(self, sample_id: int, sequence: int, why: str, note: bool = True) -> CorruptSampleError:
        """The error for a damaged sample; with ``note``, also recorded as ``damaged.json`` in the
        rank directory (best effort: a read-only disk still gets the error)."""
        with contextlib.suppress(OSError):
            if note:
                fmt.write_json(
                    self.directory / fmt.DAMAGED,
                    {"id": int(sample_id), "pack": fmt.pack_name(sequence), "why": why, "epoch": self.epoch},
                )
        return CorruptSampleError(
            f"rank {self.rank}: sample {sample_id} in this rank's own store is damaged ({why}; "
            f"{self.directory / fmt.PACK_DIR / fmt.pack_name(sequence)}): its disk, not a peer or the "
            "transfer, holds bad bytes; it was not trained. "
            f"`reshuffle verify {self.directory.parent}` lists every damaged sample; restage the store "
            "(remove it and start the job again) to recover"
        )

    def _mismatch(self, where: NDArray[np.int64], row: int) -> CorruptSampleError:
        return self.damaged(int(self.ids[where[row]]), int(self.packs[where[row]]), MISMATCH)

    def _truncated(self, sample_id: int, sequence: int, size: int, end: int) -> CorruptSampleError:
        return self.damaged(
            sample_id, sequence, f"its pack is truncated ({size} bytes, the sample ends at {end})"
        )

    # ----------------------------------------------------------------- files

    def _file(self, sequence: int, sample_id: int) -> tuple[int, int]:
        # A forked DataLoader worker inherits the descriptors and maps: positional reads share them.
        found = self._files.get(sequence)
        if found is not None:
            return found
        path = fmt.inside(self.directory, f"{fmt.PACK_DIR}/{fmt.pack_name(sequence)}")
        try:
            descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise self.damaged(sample_id, sequence, "its pack is missing") from None
        if hasattr(os, "posix_fadvise"):  # no readahead around a random read
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_RANDOM)
        opened = (descriptor, os.fstat(descriptor).st_size)
        # No lock: a DataLoader worker forked while another thread held one would wait forever.
        # Two threads opening the same pack at once keep the first; the other is closed.
        kept = self._files.setdefault(sequence, opened)
        if kept is not opened:
            os.close(descriptor)
        return kept

    def _window(self, sequence: int, length: int, sample_id: int) -> tuple[np.ndarray, int]:
        """Pack ``sequence`` as a read-only (offsets, ``length``) view: row ``o`` is the bytes at
        ``o .. o + length``, so a batch is one fancy-index copy (kept for this state's life)."""
        data = self._maps.get(sequence)
        if data is None:
            descriptor, size = self._file(sequence, sample_id)
            data = mmap.mmap(descriptor, 0, access=mmap.ACCESS_READ) if size else b""
            if isinstance(data, mmap.mmap) and hasattr(mmap, "MADV_RANDOM"):
                data.madvise(mmap.MADV_RANDOM)  # fault in the pages a read touches, no more
            data = self._maps.setdefault(sequence, data)
        array = np.frombuffer(data, dtype=np.uint8)
        rows = np.lib.stride_tricks.as_strided(
            array, shape=(max(0, array.size - length + 1), length), strides=(1, 1), writeable=False
        )
        self._rows[(sequence, length)] = rows, array.size
        return rows, array.size

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
        self._rows = {}  # the window views hold the maps' buffers
        maps, self._maps = self._maps, {}
        for data in maps.values():
            if isinstance(data, mmap.mmap):
                with contextlib.suppress(BufferError):  # a view is still alive; GC unmaps it later
                    data.close()
        files, self._files = self._files, {}
        for descriptor, _ in files.values():
            with contextlib.suppress(OSError):
                os.close(descriptor)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started with spawn get a copy without the open files and maps.
        state = self.__dict__.copy()
        state["_files"], state["_maps"], state["_rows"] = {}, {}, {}
        return state
