"""What a pack reader asks the kernel and tells it: whether a sample is in the page cache (a
one-byte read that may not wait), and the ranges a batch and the batches after it will read
(``POSIX_FADV_WILLNEED``), so that reads from the disk run side by side. The policy, when to
ask and when to announce, is :meth:`PackReader.many <reshuffle.store.reads.PackReader.many>`'s.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

# Gives what the next batches will read (PackReader: positions; RankStore: ids), asked only when
# a batch's reads go to the disk (None: none known)
Ahead = Callable[[], NDArray[np.int64] | None]


class Announcing:
    """Mixin of :class:`~reshuffle.store.reads.PackReader`, over its columns and open packs."""

    ids: NDArray[np.int64]
    packs: NDArray[np.int64]
    offsets: NDArray[np.int64]
    lengths: NDArray[np.int64]
    _files: dict[int, tuple[int, int]]  # pack -> (descriptor, size)
    _can_ask: bool  # whether the kernel says if a page is cached (RWF_NOWAIT)
    _byte: bytearray

    def _file(self, sequence: int, sample_id: int) -> tuple[int, int]:
        raise NotImplementedError

    def _in_page_cache(self, descriptor: int, start: int, length: int) -> bool | None:
        """Whether the sample of ``length`` bytes at ``start`` is in the page cache, as the kernel
        tells for the page holding its middle byte (a one-byte read that may not wait,
        ``RWF_NOWAIT``, Linux 4.14+); None where it cannot tell. That page is the sample's alone
        when it is 8 KiB or more: its first and last pages may hold a neighbour's bytes, cached
        when the neighbour was read whether this sample was or not."""
        if not self._can_ask:
            return None
        try:
            os.preadv(descriptor, [self._byte], start + length // 2, os.RWF_NOWAIT)
            return True
        except BlockingIOError:  # the read would wait for the disk
            return False
        except OSError:  # this kernel or file system does not do it: the time decides from now
            self._can_ask = False
            return None

    def _announce_ahead(self, ahead: Ahead | None) -> None:
        where = ahead() if ahead is not None else None
        if where is not None and where.size:
            self._announce(where)

    def _announce(self, where: NDArray[np.int64]) -> None:
        """Tell the kernel every range a batch will read (``POSIX_FADV_WILLNEED``), so that reads
        from the disk run side by side (a deep queue) instead of one after the other; on a warm
        cache it costs a lookup per sample."""
        if where.size < 2 or not hasattr(os, "posix_fadvise"):
            return
        ordered = where[np.lexsort((self.offsets[where], self.packs[where]))]
        files, willneed = self._files, os.POSIX_FADV_WILLNEED
        columns = (self.ids, self.packs, self.offsets, self.lengths)
        for sample_id, sequence, start, length in zip(*(c[ordered].tolist() for c in columns), strict=True):
            descriptor, _ = files.get(sequence) or self._file(sequence, sample_id)
            os.posix_fadvise(descriptor, start, length, willneed)
