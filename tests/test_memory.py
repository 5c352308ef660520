"""reshuffle.keep_freed_memory: what the process frees stays in it and is reused, instead of being
returned to the kernel and page-faulted in afresh by the next step.

Observed, not timed: a fresh process's resident memory around a 48 MiB block (larger than
glibc's largest mmap threshold, so outside the block it is always mapped afresh and unmapped on
free) that is allocated, touched and freed (glibc only; elsewhere the block is a no-op that says
so)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from reshuffle import keep_freed_memory, memory

GLIBC = memory._glibc() is not None
MIB = 1 << 20

RESIDENT = """
import os
import numpy as np
from reshuffle import keep_freed_memory, memory

def resident():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def step():
    block = np.empty(48 << 20, dtype=np.uint8)
    block[::4096] = 1  # every page written, as a step writes its activations
    del block
    return resident()

start = resident()
outside = step()
with keep_freed_memory() as kept:
    first = step()
    second = step()
    active = memory.in_effect()
released = resident()
print(kept, active, memory.in_effect(), start, outside, first, second, released)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only (elsewhere the block yields False)")
def test_freed_memory_is_reused_inside_the_block_and_released_after():
    result = subprocess.run([sys.executable, "-c", RESIDENT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    kept, active, after_active, *sizes = result.stdout.split()
    assert (kept, active, after_active) == ("True", "True", "False")
    start, outside, first, second, released = map(int, sizes)
    assert outside - start < 8 * MIB  # by default the freed block went back to the kernel
    assert first - start > 40 * MIB  # inside, it stays in the process
    assert abs(second - first) < 8 * MIB  # and the next step reuses it: no growth
    assert released - start < 8 * MIB  # leaving the block returns it


def test_nested_blocks_restore_once_and_off_does_nothing():
    with keep_freed_memory(enabled=False) as kept:
        assert kept is False and not memory.in_effect()
    with keep_freed_memory() as outer:
        with keep_freed_memory() as inner:
            assert inner == outer == GLIBC
        assert memory.in_effect() == GLIBC  # the inner block's end leaves the outer one's settings
    assert not memory.in_effect()
