"""Keeping a store's space near its live bytes: compaction of mostly-dead packs and punching
holes where samples left (see :mod:`reshuffle.store.space` for the file-system calls)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from reshuffle.store import format as fmt
from reshuffle.store.packs import PackWriter
from reshuffle.store.space import dead_ranges, punch_holes

# Rewrite a pack once less than this share of the space it holds (its allocated blocks: punched
# holes do not count) is live. Where holes free the dead ranges (samples of a block or more) this
# seldom happens; where they cannot (smaller samples, or no hole punching) it bounds the waste.
COMPACT_BELOW = 0.5
# ... or once its live bytes are under this share of its length: gathers nearly empty sparse packs,
# so their number stays bounded.
COMPACT_NEARLY_EMPTY = 0.1


def compacted(
    pack_dir: Path, kept: np.ndarray, writer: PackWriter, read: Callable[[np.void], memoryview | bytes]
) -> np.ndarray:
    """``kept`` (records of the packs in ``pack_dir``) with the records of mostly-dead packs
    rewritten through ``writer``; ``read`` gives a record's checked bytes."""
    sequences, inverse = np.unique(kept["pack"], return_inverse=True)
    live = np.bincount(inverse, weights=kept["length"].astype(np.float64), minlength=sequences.size)
    stats = [(pack_dir / fmt.pack_name(int(s))).stat() for s in sequences]
    sizes = np.array([st.st_size for st in stats], dtype=np.float64)
    held = np.array([st.st_blocks * 512 for st in stats], dtype=np.float64)  # holes excluded
    wasteful = (live < COMPACT_BELOW * held) | (live < COMPACT_NEARLY_EMPTY * sizes)
    mostly_dead = sequences[(sizes > 0) & wasteful]
    if mostly_dead.size == 0:
        return kept
    move = np.isin(kept["pack"], mostly_dead)
    try:
        for record in kept[move]:
            writer.append(int(record["id"]), int(record["label"]), read(record), int(record["crc"]))
        rewritten = writer.close()
    except BaseException:
        writer.abort()
        raise
    return np.concatenate([kept[~move], rewritten])


def punch_dead_ranges(pack_dir: Path, records: np.ndarray, packs: set[int] | None, *, root: Path) -> int:
    """Punch holes over the ranges of ``packs`` (None: every pack) that no record of ``records``
    uses; returns the bytes in those ranges. Nothing outside ``root`` is touched."""
    held = set(np.unique(records["pack"]).tolist())
    punched = 0
    for sequence in sorted(held if packs is None else held & packs):
        mine = records[records["pack"] == sequence]
        path = pack_dir / fmt.pack_name(sequence)
        ranges = dead_ranges(mine["offset"], mine["length"], path.stat().st_size)
        punch_holes(path, ranges, root=root)
        punched += sum(stop - start for start, stop in ranges)
    return punched
