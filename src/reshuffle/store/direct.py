"""Reads around the page cache, for a store bigger than it: ``O_DIRECT`` through ``io_uring``.

A batch whose reads go to the disk is read with direct I/O, ``DEPTH`` reads in flight per
process, each into its own slot of a page-aligned buffer, where the reader checks it and copies
it out. The kernel neither copies the pages through its cache nor has to evict and reclaim them:
with the page cache at 30% of a 4.2 GB store, 2 readers, this read 1.22x the samples/s of
buffered reads at less than half the CPU (``bench/pressure_reads.py``), and DataLoader epochs ran
1.32-1.88x (``bench/scale.py``'s harness; docs/benchmarks.md). A store that fits in the
memory the kernel says is available (``MemAvailable``) keeps buffered reads, so that its later
epochs read it from memory. The ranks of one machine share its page cache: their stores count
together (``RankStore.share_memory``, called by the store session for the ranks on each host).

Needs Linux, the ``liburing`` package (``pip install 'reshuffle[uring]'``) and a file system
that takes ``O_DIRECT``; without one of them (a container whose seccomp profile refuses
io_uring, tmpfs) reads stay buffered, and so do records longer than a slot. The environment
variable ``RESHUFFLE_DIRECT_READS`` overrides the choice: ``1`` reads every batch that goes to
the disk directly, ``0`` none.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import mmap
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from reshuffle.store import format as fmt
from reshuffle.store.checksum import MISMATCH, Checksum

DEPTH = 32  # reads in flight per process (16, 32 and 64 measured: within the disk's spread)
SLOT = 512 << 10  # bytes of buffer per read in flight: records up to ~500 KB are read directly
ALIGN = 4096  # O_DIRECT's offsets, lengths and buffers, aligned for any disk's logical block
SETTING = "RESHUFFLE_DIRECT_READS"
CACHESTAT = 451  # cachestat(2)'s system call number (Linux 6.5+; one table for x86-64 and arm64)

# Records of this many bytes or more may be read in two parts (:meth:`PackReader.many`): the first
# PROBE bytes hold the head of any item ``reshuffle.data.items`` writes with a body.
SPLIT_FROM = 16 << 10
PROBE = 512

# (sample_id, pack, start, length, crc) of one record, as PackReader.many walks them
Row = tuple[int, int, int, int, int]
# a decoder's: a record's first PROBE bytes -> how many of them come before its body, or None
HeadSize = Callable[[bytes], int | None]


def wanted(store_bytes: int) -> bool:
    """Whether stores of ``store_bytes`` (one rank's, or together those of the ranks that share a
    machine's page cache) are read around it (``SETTING``, else: larger than the memory available)."""
    setting = os.environ.get(SETTING, "auto")
    if setting not in ("auto", "0", "1"):
        raise ValueError(
            f"{SETTING} must be auto (around the page cache for a store larger than memory), "
            f"1 (always) or 0 (never), got {setting!r}"
        )
    if setting != "auto":
        return setting == "1"
    available = memory_available()
    if available is None or store_bytes <= available:
        return False
    if importlib.util.find_spec("liburing") is None and not _said:
        _said.append(True)
        warnings.warn(
            f"the stores this machine reads ({store_bytes / 1e9:.1f} GB) are larger than the memory "
            f"available ({available / 1e9:.1f} GB): `pip install 'reshuffle[uring]'` reads them around "
            "the page cache (1.3-1.9x the samples/s measured, docs/store.md); without it reads stay "
            "buffered",
            stacklevel=2,
        )
    return True


def memory_available() -> int | None:
    """The bytes of memory the kernel says are available (``MemAvailable``: free, and page cache
    it can reclaim), or None where it does not say."""
    try:
        with open("/proc/meminfo") as handle:
            return 1024 * next(int(line.split()[1]) for line in handle if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


_said: list[bool] = []  # the missing liburing was said in this process
_libc: list[Any] = []  # the C library, for cachestat(2), which the os module does not offer


def _system_call() -> Any:
    """libc's ``syscall``, or None where there is none to load."""
    if not _libc:
        try:
            _libc.append(ctypes.CDLL(None, use_errno=True).syscall)
        except (OSError, TypeError, AttributeError):  # no C library by that name (Windows)
            _libc.append(None)
    return _libc[0]


class Superseded(OSError):
    """A direct read's caller asked for its next record after a later read began."""


class DirectReads:
    """Direct reads of one rank directory's packs, in each process that reads them (a forked
    DataLoader worker builds its own ring on its first read)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory  # the rank directory
        self.off: str | None = None  # why direct reads are off in this process (None: they may run)
        self._pid = -1
        self._ring: Any = None
        self._files: dict[int, int] = {}  # pack -> O_DIRECT descriptor
        self._generation = self._tag = self._in_flight = 0  # reads begun; reads submitted; in flight
        self._thread = -1  # the thread that reads with the ring
        self._building = threading.Lock()
        self._asks = True  # whether cachestat(2) answers here
        self._range = (ctypes.c_uint64 * 2)()  # its arguments: offset, length
        self._stat = (ctypes.c_uint64 * 5)()  # its answer: pages cached, dirty, ...

    def holds(self, descriptor: int, start: int, length: int) -> bool:
        """Whether the page cache holds every page of the ``length`` bytes at ``start``, as
        ``cachestat(2)`` says without reading anything (a one-byte read that may not wait starts
        the page's read when it misses); False where the kernel does not answer (before 6.5)."""
        call = _system_call() if self._asks else None
        if call is None:
            return False
        first = start // ALIGN * ALIGN
        self._range[0], self._range[1] = first, -(-(start + length) // ALIGN) * ALIGN - first
        if call(CACHESTAT, descriptor, self._range, self._stat, 0) != 0:
            self._asks = False
            return False
        return self._stat[0] * mmap.PAGESIZE >= self._range[1]

    def fits(self, length: int) -> bool:
        return length + 2 * ALIGN <= SLOT

    def usable(self) -> bool:
        """Whether this thread can read directly: the first thread of a process that asks builds
        the process's ring and reads with it; any other thread reads through the page cache (one
        ring, one set of slots)."""
        me, thread = os.getpid(), threading.get_ident()
        if self._pid != me:
            # not blocking: a worker forked while another thread held it reads through the page cache
            if not self._building.acquire(blocking=False):
                return False
            try:
                if self._pid != me:
                    self._reset()
                    self._build()
                    self._pid, self._thread = me, thread
            finally:
                self._building.release()
        return self.off is None and self._thread == thread

    def _build(self) -> None:
        if self.off is not None:  # inherited: what failed in the parent would fail here
            return
        try:
            import liburing

            self._ring = liburing.Ring()
            liburing.io_uring_queue_init(2 * DEPTH, self._ring)
            self._buffer = mmap.mmap(-1, SLOT * DEPTH)  # page-aligned
            self._view = memoryview(self._buffer)
        except (ImportError, OSError) as error:
            self._ring = None
            self.off = f"io_uring is not available ({error})"

    def read(self, rows: list[Row]) -> Iterator[memoryview]:
        """Each row's bytes, in order, as a view valid until the next is asked for. Raises
        OSError where a read fails (``off`` says why: this process reads directly no more), or
        :class:`Superseded` once a later ``read`` began (its slots are the same)."""
        import liburing

        self._drain()  # an earlier read its caller left unfinished
        if self.off is not None:
            raise OSError(self.off)
        self._generation += 1
        generation, ring, completions = self._generation, self._ring, liburing.Cqe()
        tags: dict[int, int] = {}  # tag (the kernel's user_data) -> row
        pending: dict[int, tuple[int, int, Any]] = {}  # row -> slot, where its bytes start, iovec
        finished: dict[int, int] = {}  # row -> bytes read into its slot
        submitted = 0

        def submit(index: int, slot: int) -> None:
            _, sequence, start, length, _ = rows[index]
            first, end = start // ALIGN * ALIGN, -(-(start + length) // ALIGN) * ALIGN
            iovec = liburing.Iovec([self._view[slot * SLOT : slot * SLOT + end - first]])
            entry = liburing.io_uring_get_sqe(ring)
            liburing.io_uring_prep_readv(entry, self._descriptor(sequence), iovec, first)
            self._tag += 1
            entry.user_data, tags[self._tag] = self._tag, index
            pending[index] = (slot, slot * SLOT + start - first, iovec)
            self._in_flight += 1

        try:
            for slot in range(min(DEPTH, len(rows))):
                submit(submitted, slot)
                submitted += 1
            liburing.io_uring_submit(ring)
            for index in range(len(rows)):
                while index not in finished:
                    liburing.io_uring_wait_cqe(ring, completions)
                    done = completions[0]
                    tag, got = done.user_data, done.res
                    liburing.io_uring_cqe_seen(ring, done)
                    self._in_flight -= 1
                    if tag in tags:
                        finished[tags.pop(tag)] = got
                slot, begins, _ = pending.pop(index)
                got = finished.pop(index) - (begins - slot * SLOT)
                yield self._view[begins : begins + max(0, min(rows[index][3], got))]
                if self._generation != generation:
                    raise Superseded("a later read took this process's slots")
                if submitted < len(rows):
                    submit(submitted, slot)
                    submitted += 1
                    liburing.io_uring_submit(ring)
        except Superseded:
            raise
        except OSError as error:
            self.off = f"a direct read failed ({error})"
            self._reset()
            raise
        finally:
            if self._generation == generation:  # finished, or its caller stopped early
                self._drain()

    def _drain(self) -> None:
        """Wait for the reads still in flight and drop them."""
        if not self._in_flight or self._ring is None:
            return
        import liburing

        completions = liburing.Cqe()
        try:
            while self._in_flight:
                liburing.io_uring_wait_cqe(self._ring, completions)
                liburing.io_uring_cqe_seen(self._ring, completions[0])
                self._in_flight -= 1
        except OSError as error:
            self.off = f"a direct read failed ({error})"
            self._reset()

    def _descriptor(self, sequence: int) -> int:
        descriptor = self._files.get(sequence)
        if descriptor is None:
            flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0) | getattr(os, "O_CLOEXEC", 0)
            path = fmt.inside(self.directory, f"{fmt.PACK_DIR}/{fmt.pack_name(sequence)}")
            descriptor = self._files[sequence] = os.open(path, flags)
        return descriptor

    def _reset(self) -> None:
        """Close this process's ring and descriptors (inherited ones belong to the parent)."""
        if self._pid == os.getpid():
            if self._ring is not None:
                import liburing

                with contextlib.suppress(OSError):
                    liburing.io_uring_queue_exit(self._ring)
            for descriptor in self._files.values():
                with contextlib.suppress(OSError):
                    os.close(descriptor)
        self._ring, self._files, self._in_flight = None, {}, 0

    def close(self) -> None:
        self._reset()
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory}  # a spawned DataLoader worker builds its own ring

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"])  # type: ignore[misc]


class AroundPageCache:
    """Mixin of :class:`~reshuffle.store.reads.PackReader`: a batch's records read directly."""

    checksum: Checksum
    _direct: DirectReads | None
    _files: dict[int, tuple[int, int]]  # pack -> (descriptor, size)

    def _file(self, sequence: int, sample_id: int) -> tuple[int, int]:
        raise NotImplementedError

    def _read_buffered(
        self, descriptor: int, start: int, length: int, head_size: HeadSize | None
    ) -> tuple[bytes | tuple[bytes, bytes], int]:
        raise NotImplementedError

    def damaged(self, sample_id: int, sequence: int, why: str, note: bool = True) -> fmt.StoreError:
        raise NotImplementedError

    def _truncated(self, sample_id: int, sequence: int, size: int, end: int) -> fmt.StoreError:
        raise NotImplementedError

    def _verify(
        self, record: bytes | memoryview | tuple[bytes, bytes], got: int, sample_id: int, sequence: int,
        start: int, length: int, crc: int,
    ) -> None:  # fmt: skip
        """Raise for a record of which ``got`` of ``length`` bytes were read or whose bytes (whole,
        or head and body) do not match ``crc``."""
        if got != length:  # the pack shrank since it was opened
            raise self._truncated(sample_id, sequence, start + got, start + length)
        check = self.checksum
        found = check(record[1], check(record[0])) if isinstance(record, tuple) else check(record)
        if found != crc:
            raise self.damaged(sample_id, sequence, MISMATCH)

    def _many_direct(
        self, rows: list[Row], head_size: HeadSize | None
    ) -> Iterator[bytes | tuple[bytes, bytes]]:
        """:meth:`many`'s records from ``rows`` on (the first is not in the page cache), read
        around the page cache (:mod:`reshuffle.store.direct`): each checked where it landed, then
        copied out. A record the page cache holds whole (:meth:`DirectReads.holds`), one too long
        for a slot, or any after a direct read failed, is read through the page cache: in
        consecutive epochs the cache holds what the last one left there (2 ranks, memory for ~60%
        of their stores: 0.85-1.33x the buffered reads over two runs, median 1.15x, where reading
        every record around the cache ran 0.78-1.09x; ``bench/pressure_ranks.py``)."""
        direct = self._direct
        assert direct is not None
        files = self._files
        held = direct.holds
        around = [  # the first was found not cached; a pack not open yet is not asked
            direct.fits(length)
            and not (index and sequence in files and held(files[sequence][0], start, length))
            for index, (_, sequence, start, length, _) in enumerate(rows)
        ]
        views, live = direct.read([row for row, chosen in zip(rows, around, strict=True) if chosen]), True
        for (sample_id, sequence, start, length, crc), chosen in zip(rows, around, strict=True):
            descriptor, size = files.get(sequence) or self._file(sequence, sample_id)
            if start + length > size:
                raise self._truncated(sample_id, sequence, size, start + length)
            view = None
            if live and chosen:
                try:
                    view = next(views)
                except OSError:  # direct.off says why (or a later read took the slots): buffered
                    live = False
            if view is None:
                record, got = self._read_buffered(descriptor, start, length, head_size)
                self._verify(record, got, sample_id, sequence, start, length, crc)
            else:
                self._verify(view, len(view), sample_id, sequence, start, length, crc)
            if view is not None:  # checked where it landed: copied out whole, or as head and body
                cut = (
                    head_size(bytes(view[:PROBE])) if head_size is not None and length >= SPLIT_FROM else None
                )
                record = (
                    bytes(view) if cut is None or cut >= length else (bytes(view[:cut]), bytes(view[cut:]))
                )
            yield record
