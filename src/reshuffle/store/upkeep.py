"""Keeping a store's space near its live bytes: compaction of mostly-dead packs and punching
holes where samples left (see :mod:`reshuffle.store.space` for the file-system calls)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from reshuffle.store import format as fmt
from reshuffle.store.packs import PackWriter
from reshuffle.store.space import dead_ranges, punch_holes

if TYPE_CHECKING:
    from reshuffle.store.rank_store import RankStore

# Rewrite a pack once less than this share of the space it holds (its allocated blocks: punched
# holes do not count) is live. Where holes free the dead ranges (samples of a block or more) this
# seldom happens; where they cannot (smaller samples, or no hole punching) it bounds the waste.
COMPACT_BELOW = 0.5
# ... or once its live bytes are under this share of its length: gathers nearly empty sparse packs,
# so their number stays bounded.
COMPACT_NEARLY_EMPTY = 0.1


def compacted(store: RankStore, kept: np.ndarray, writer: PackWriter) -> np.ndarray:
    """``kept`` with the records of mostly-dead packs rewritten through ``writer``."""
    sequences, inverse = np.unique(kept["pack"], return_inverse=True)
    live = np.bincount(inverse, weights=kept["length"].astype(np.float64), minlength=sequences.size)
    stats = [(store.pack_dir / fmt.pack_name(int(s))).stat() for s in sequences]
    sizes = np.array([st.st_size for st in stats], dtype=np.float64)
    held = np.array([st.st_blocks * 512 for st in stats], dtype=np.float64)  # holes excluded
    wasteful = (live < COMPACT_BELOW * held) | (live < COMPACT_NEARLY_EMPTY * sizes)
    mostly_dead = sequences[(sizes > 0) & wasteful]
    if mostly_dead.size == 0:
        return kept
    move = np.isin(kept["pack"], mostly_dead)
    try:
        for record in kept[move]:
            writer.append(
                int(record["id"]), int(record["label"]), store.record_bytes(record), int(record["crc"])
            )
        rewritten = writer.close()
    except BaseException:
        writer.abort()
        raise
    return np.concatenate([kept[~move], rewritten])


def punch_dead_ranges(store: RankStore) -> int:
    """Free the blocks of dead ranges in packs that lost samples since the last call; returns
    the bytes in those ranges. Safe while the store is read or an exchange writes new packs:
    it touches only ranges no record uses (first punches cost ~0.2 ms each on ext4, so the
    exchanger runs this beside its transfers)."""
    if not store.can_punch_holes():
        return 0
    records = store.records  # one committed state, even if a commit happens meanwhile
    dirty, store.dirty_packs = store.dirty_packs, set()
    packs = set(np.unique(records["pack"]).tolist())
    punched = 0
    for sequence in sorted(packs if dirty is None else packs & dirty):
        mine = records[records["pack"] == sequence]
        path = store.pack_dir / fmt.pack_name(sequence)
        ranges = dead_ranges(mine["offset"], mine["length"], path.stat().st_size)
        punch_holes(path, ranges, root=store.directory)
        punched += sum(stop - start for start, stop in ranges)
    return punched


class Background:
    """Run a function in a thread; ``join`` returns its result or raises its error."""

    def __init__(self, function: Callable[[], object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, args=(function,), daemon=True)
        self.thread.start()

    def _work(self, function: Callable[[], object]) -> None:
        try:
            self.result = function()
        except BaseException as error:  # handed to join()
            self.error = error

    def join(self) -> object:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result
