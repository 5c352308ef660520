"""Host memory for training on the CPU: keep what the process frees, for the next step to reuse.

glibc's ``malloc`` serves every block of 128 KiB or more (a threshold it raises to at most 32 MiB
as such blocks are freed) with a fresh ``mmap`` and gives it back to the kernel on ``free``. A
training step on the CPU allocates its activations and their gradients and frees them, every
step: so every step the kernel maps and zeroes those pages afresh, one page fault per 4 KiB.
Keeping the freed memory trades resident memory (the process holds its peak until the block
ends) for those faults; what it buys and costs is measured in docs/training.md.

:func:`keep_freed_memory` is what ``train.keep_freed_memory`` applies (``auto``: when training on
the CPU); any training loop can use it::

    with reshuffle.keep_freed_memory():
        for epoch in range(epochs):
            ...

It sets ``mallopt(M_MMAP_MAX, 0)`` (large blocks come from the heap, which is reused) and a 2 GiB
trim threshold (the heap is not shrunk behind every free), both inherited by forked ``DataLoader``
workers. On leaving, glibc's defaults come back and the kept memory is returned (``malloc_trim``).
Elsewhere (macOS, musl) it does nothing and says so by yielding ``False``. The same settings from
outside, for any process: ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647``.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
from collections.abc import Iterator

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
KEEP = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}
GLIBC_DEFAULTS = {M_MMAP_MAX: 65536, M_TRIM_THRESHOLD: 128 * 1024}

_lock = threading.Lock()
_depth = 0  # nested blocks: the outermost one sets and restores
_applied = False


def _glibc() -> ctypes.CDLL | None:
    """The running C library when it is glibc (it has ``gnu_get_libc_version``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc


def _set(libc: ctypes.CDLL, values: dict[int, int]) -> bool:
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in values.items())


@contextlib.contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Inside the block, memory the process frees stays in it for reuse instead of going back to
    the kernel (glibc only). Yields whether it is in effect. Nested blocks are fine: the
    outermost restores."""
    global _depth, _applied
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    with _lock:
        if _depth == 0:
            _applied = _set(libc, KEEP)
        _depth += 1
    try:
        yield _applied
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set(libc, GLIBC_DEFAULTS)
                libc.malloc_trim(0)


def in_effect() -> bool:
    """Whether a :func:`keep_freed_memory` block is in effect in this process now."""
    return _depth > 0 and _applied
