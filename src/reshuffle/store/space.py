"""Giving dead bytes back to the file system without rewriting packs.

Samples leave a rank in random order, so dead bytes spread thinly over every pack; compaction
alone would rewrite most of the store to reclaim them. Linux ``fallocate(PUNCH_HOLE)`` frees the
blocks of dead ranges in place (ext4, xfs, btrfs, tmpfs); where it is unsupported, nothing is
punched and compaction of mostly-dead packs still bounds the waste.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

import numpy as np

BLOCK = 4096
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def _fallocate():  # pragma: no cover - depends on the platform
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    function = ctypes.CDLL(name, use_errno=True).fallocate
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return function


_FALLOCATE = _fallocate()


def dead_ranges(offsets: np.ndarray, lengths: np.ndarray, size: int) -> list[tuple[int, int]]:
    """Block-aligned ``(start, stop)`` ranges of ``[0, size)`` that no live record touches."""
    order = np.argsort(offsets)
    starts, stops = offsets[order].astype(np.int64), (offsets[order] + lengths[order]).astype(np.int64)
    gap_starts = np.concatenate([[0], stops])
    gap_stops = np.concatenate([starts, [size]])
    aligned_starts = -(-gap_starts // BLOCK) * BLOCK
    aligned_stops = gap_stops // BLOCK * BLOCK
    keep = aligned_stops > aligned_starts
    return list(zip(aligned_starts[keep].tolist(), aligned_stops[keep].tolist(), strict=True))


def punch_holes(path: Path, ranges: list[tuple[int, int]], root: Path | None = None) -> bool:
    """Free ``ranges`` of ``path`` in place; False if the file system cannot. With ``root``, the
    path must lie inside it (a store's file: see :func:`~reshuffle.store.format.open_for_writing`)."""
    if _FALLOCATE is None or not ranges:
        return _FALLOCATE is not None
    fd = _open(path, os.O_RDWR, root)
    try:
        for start, stop in ranges:
            if _FALLOCATE(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, start, stop - start) != 0:
                return False
    finally:
        os.close(fd)
    return True


def _open(path: Path, flags: int, root: Path | None) -> int:
    from reshuffle.store.format import open_for_writing

    return open_for_writing(path, flags, root) if root is not None else os.open(path, flags, 0o644)


def reserve(path: Path, size: int, root: Path | None = None) -> bool:
    """Create ``path`` with ``size`` bytes of blocks allocated up front (``fallocate``), so that
    writing them later copies bytes instead of allocating pages; False (and no file) where the
    file system cannot (there writes allocate as they go)."""
    if _FALLOCATE is None or size <= 0:
        return False
    fd = _open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, root)
    try:
        done = _FALLOCATE(fd, 0, 0, size) == 0
    finally:
        os.close(fd)
    if not done:
        path.unlink(missing_ok=True)
    return done


def can_punch_holes(directory: Path) -> bool:
    """Whether the file system under ``directory`` frees punched ranges (probed with a temp file)."""
    if _FALLOCATE is None:
        return False
    probe = directory / f".punch-probe-{os.getpid()}.tmp"
    try:
        probe.write_bytes(bytes(2 * BLOCK))
        return punch_holes(probe, [(0, BLOCK)])
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)


def allocated_bytes(root: Path) -> int:
    """Bytes the file system allocates for every file under ``root`` (holes excluded)."""
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())
