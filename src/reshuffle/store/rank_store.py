"""``RankStore``: one rank's samples on node-local storage, changed only by atomic commits.

The committed state is ``manifest.json``: an epoch, a generation, and the index of that
generation (one record per sample: id, label, pack, offset, length, crc32). Pack files are
immutable once written. Changing the samples takes two phases, so that a crash at any point
loses and duplicates nothing across ranks:

1. :meth:`prepare`: new samples are already in fsynced packs; write the next index and
   ``prepared.json`` (durable), leaving the committed state untouched;
2. :meth:`commit`: ``rename(prepared.json, manifest.json)``, atomic.

The caller (the exchanger) puts a barrier between the phases on all ranks, and recovery after a
crash (``Exchanger.synchronize``) rolls a prepared state forward or discards it, as the ranks
agree. Packs that an exchange leaves mostly dead are rewritten during :meth:`prepare` (in the
background); after a commit, :meth:`release_dead_space` deletes unreferenced files and punches
holes where samples left (cheap, at the epoch boundary).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from reshuffle.store import format as fmt
from reshuffle.store.announce import Ahead
from reshuffle.store.meta import StoreMeta, read_meta
from reshuffle.store.packs import MAX_PACK_BYTES, PackWriter
from reshuffle.store.reads import CorruptSampleError, PackReader
from reshuffle.store.space import can_punch_holes, reserve
from reshuffle.store.state import parse_state
from reshuffle.store.upkeep import compacted, punch_dead_ranges


class RankStore:
    """The committed samples of one rank. Construct with :meth:`open` or :func:`stage`."""

    def __init__(self, root: Path, rank: int, meta: StoreMeta) -> None:
        self.root = root
        self.rank = rank
        self.meta = meta
        self.directory = root / fmt.rank_dir_name(rank)
        self.pack_dir = self.directory / fmt.PACK_DIR
        self.epoch = -1
        self.generation = 0
        self.records = np.empty(0, dtype=fmt.RECORD)
        self.ranks_sharing_memory = 1  # ranks whose stores this machine's page cache holds (share_memory)
        self.reader = self._reader()  # new at each load
        self._holes: bool | None = None  # can this file system punch holes? (probed once)
        self.lock: int | None = None  # the job lock's descriptor (format.lock_directory), once staged
        self.dirty_packs: set[int] | None = None  # packs that lost samples since the last release; None: all

    # ----------------------------------------------------------------- opening and checking

    @classmethod
    def open(cls, root: str | Path, rank: int, meta: StoreMeta | None = None) -> RankStore:
        """Open rank ``rank``'s committed state; ``meta`` (the job's) must match ``store.json``.
        (:func:`reshuffle.store.verify.open_verified` also checks every sample first.)

        Raises:
            StoreError: the store is missing, for another job, or damaged (the message names it).
        """
        root = Path(root)
        written = read_meta(root)
        if meta is not None and (why := meta.mismatch(written)):
            raise fmt.StoreError(f"store {root}: {why}")
        if not 0 <= rank < written.world_size:
            raise fmt.StoreError(f"store {root} has ranks 0..{written.world_size - 1}, not {rank}")
        store = cls(root, rank, written)
        store._load(store.directory / fmt.MANIFEST)
        return store

    def refresh(self) -> bool:
        """Reload the committed state if another process committed since (a DataLoader worker
        that outlives an epoch boundary); returns whether it changed."""
        path = self.directory / fmt.MANIFEST
        if fmt.manifest_value(fmt.read_json(path, "manifest"), "generation", int, path) == self.generation:
            return False
        self._load(path)
        return True

    def _load(self, manifest_path: Path) -> None:
        manifest = fmt.read_json(manifest_path, "manifest")
        self.epoch, self.generation, self.records = parse_state(
            manifest, manifest_path, self.directory, self.rank, self.meta
        )
        self.reader.close()
        self.reader = self._reader()

    def _reader(self) -> PackReader:
        return PackReader(self.directory, self.rank, self.epoch, self.records, self.meta.checksum,
                          sharing=self.ranks_sharing_memory)  # fmt: skip

    def share_memory(self, ranks: int) -> None:
        """``ranks`` ranks of the job, this one included, keep their stores on this machine: their
        reads compete for one page cache, so whether they go around it
        (:func:`~reshuffle.store.direct.wanted`) is decided for the stores together."""
        self.ranks_sharing_memory = ranks
        self.reader.close()
        self.reader = self._reader()

    def referenced_files(self) -> set[str]:
        """Paths (relative to the rank directory) the committed or prepared state uses."""
        names = {fmt.MANIFEST, fmt.LOCK, fmt.DAMAGED}
        for state in (fmt.MANIFEST, fmt.PREPARED):
            path = self.directory / state
            if not path.is_file():
                continue
            names.add(state)
            value = fmt.read_json(path, "rank state")
            if isinstance(value.get("index"), str):
                names.add(value["index"])
            names.update(f"{fmt.PACK_DIR}/{name}" for name in value.get("pack_sizes", {}))
        return names

    # ----------------------------------------------------------------- reading

    @property
    def ids(self) -> NDArray[np.int64]:
        """Sorted ids this rank holds."""
        return self.records["id"]

    def __len__(self) -> int:
        return int(self.records.size)

    def position(self, sample_ids: NDArray[np.int64] | int) -> NDArray[np.int64]:
        """Positions of ``sample_ids`` in :attr:`records`; KeyError for ids not held."""
        ids = np.atleast_1d(np.asarray(sample_ids, dtype=np.int64))
        where, found = self._lookup(ids)
        if not found.all():
            missing = ids[~found]
            raise KeyError(
                f"rank {self.rank} does not hold sample(s) {missing[:10].tolist()} at epoch {self.epoch}"
            )
        return where

    def read(self, sample_id: int) -> bytes:
        """The stored bytes of ``sample_id``, checked (one binary search, one positional read)."""
        return self.sample(sample_id)[0]

    def sample(self, sample_id: int) -> tuple[bytes, int]:
        """``(bytes, label)`` of ``sample_id``, checked against its checksum: what a DataLoader
        worker reads per item (:class:`~reshuffle.store.reads.CorruptSampleError` if damaged)."""
        return self.reader.sample(self.reader.where(sample_id))

    def read_many(
        self,
        sample_ids: NDArray[np.int64],
        head_size: Callable[[bytes], int | None] | None = None,
        ahead: Ahead | None = None,
    ) -> Iterator[bytes | tuple[bytes, bytes]]:
        """The stored bytes of each of ``sample_ids`` (lazily), checked; a batch's disk reads
        overlap. A KeyError for an id not held comes before the first. With ``head_size``, a
        record with a body comes as ``(head, body)``; ``ahead``: gives the ids the next batches
        will read, announced with this batch's reads when they go to the disk, and asked only
        then (those not held are left out) (:meth:`PackReader.many
        <reshuffle.store.reads.PackReader.many>`)."""
        return self.reader.many(self.position(sample_ids), head_size, self._positions_of(ahead))

    def samples(
        self, sample_ids: NDArray[np.int64], ahead: Ahead | None = None
    ) -> tuple[NDArray[np.uint8], NDArray[np.int64]] | None:
        """``(bytes, labels)`` of many samples at once, checked: a (B, L) uint8 array when all B
        samples are L bytes long; ``None`` when their lengths differ (read them with :meth:`sample`).
        ``ahead``: as for :meth:`read_many`."""
        return self.reader.samples(self.position(sample_ids), self._positions_of(ahead))

    def _positions_of(self, ahead: Ahead | None) -> Ahead | None:
        """What gives the positions in :attr:`records` of those of the ids ``ahead`` gives that
        this store holds."""
        if ahead is None:
            return None

        def positions() -> NDArray[np.int64] | None:
            ids = ahead()
            if ids is None:
                return None
            where, found = self._lookup(ids)
            return where[found]

        return positions

    def _lookup(self, ids: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
        """Where each of ``ids`` would be in :attr:`records`, and whether it is there."""
        held = self.reader.ids  # records["id"], contiguous (the reader is rebuilt with the records)
        where = np.minimum(held.searchsorted(ids), max(0, held.size - 1))
        found = held[where] == ids if held.size else np.zeros(ids.shape, dtype=bool)
        return where, found

    def damage(self) -> str | None:
        """What a read recorded as damaged in this store (``damaged.json``), in words, or None."""
        path = self.directory / fmt.DAMAGED
        if not path.is_file():
            return None
        found = fmt.read_json(path, "damage record")
        return (
            f"a read found sample {found.get('id')} damaged ({found.get('why')}; {found.get('pack')}) and "
            "kept it out of training; restage the store (remove it and start the job again)"
        )

    def check_damage(self) -> None:
        """Raise :class:`CorruptSampleError` if a read recorded a damaged sample in this store."""
        if (damage := self.damage()) is not None:
            raise CorruptSampleError(f"rank {self.rank}'s store {self.directory}: {damage}")

    def label(self, sample_id: int) -> int:
        return int(self.records["label"][int(self.position(sample_id)[0])])

    def record_bytes(self, record: np.void, *, note_damage: bool = True) -> bytes:
        """One record's bytes, checked (``note_damage=False``: an offline check, which records
        nothing in the store)."""
        return self.reader.record(int(record["pack"]), int(record["offset"]), int(record["length"]),
                                  int(record["crc"]), int(record["id"]), note_damage=note_damage)  # fmt: skip

    # ----------------------------------------------------------------- writing

    def next_pack_sequence(self) -> int:
        existing = [fmt.pack_sequence(p.name) for p in self.pack_dir.glob("pack-*.bin")]
        return max([s for s in existing if s is not None] + [0]) + 1

    def pack_writer(self, max_bytes: int = MAX_PACK_BYTES, *, reserved: bool = False) -> PackWriter:
        """A writer of new packs; with ``reserved``, its first pack is the space :meth:`reserve`
        allocated (when there is one)."""
        reserve = self.pack_dir / fmt.RESERVE if reserved else None
        return PackWriter(
            self.pack_dir, self.next_pack_sequence(), max_bytes, reserve, root=self.directory,
            checksum_name=self.meta.checksum,
        )  # fmt: skip

    def reserve(self, size: int) -> int:
        """Allocate ``size`` bytes of blocks for the next exchange's arrivals (``packs/reserve.bin``),
        so that landing them copies bytes instead of allocating pages; returns the bytes reserved
        (0 where the file system cannot, or on any error: writes then allocate as they go)."""
        try:
            return size if reserve(self.pack_dir / fmt.RESERVE, size, root=self.directory) else 0
        except OSError:
            (self.pack_dir / fmt.RESERVE).unlink(missing_ok=True)
            return 0

    def drop_reserve(self) -> None:
        """Remove the space allocated ahead (no exchange follows: it would only take disk)."""
        (self.pack_dir / fmt.RESERVE).unlink(missing_ok=True)

    def _state(self, epoch: int, generation: int, records: np.ndarray) -> dict[str, Any]:
        """Write the index of ``records`` and return the manifest that commits it."""
        records = np.sort(records, order="id")
        index = fmt.index_name(generation)
        digest = fmt.write_index(self.directory / index, records)
        sequences = np.unique(records["pack"]).tolist()
        return {
            "format": "reshuffle-rank-store",
            "version": fmt.FORMAT_VERSION,
            "rank": self.rank,
            "world_size": self.meta.world_size,
            "epoch": epoch,
            "generation": generation,
            "index": index,
            "index_sha256": digest,
            "count": int(records.size),
            "pack_sizes": {
                fmt.pack_name(s): (self.pack_dir / fmt.pack_name(s)).stat().st_size for s in sequences
            },
        }

    def prepare(
        self,
        epoch: int,
        removed: NDArray[np.int64],
        added: np.ndarray,
        compact_into: PackWriter | None = None,
    ) -> None:
        """Phase 1: make ``epoch``'s state (these records minus ``removed``, plus ``added``, whose
        packs are already fsynced) durable in ``prepared.json``; the committed state is untouched.

        With ``compact_into``, packs that the new state leaves mostly dead (less than
        ``COMPACT_BELOW`` of the space they hold is live, or less than ``COMPACT_NEARLY_EMPTY`` of
        their length) have their live records copied there first, so the old packs can go after
        the commit: compaction happens here, off the epoch boundary. Where the file system
        punches holes, the dead ranges of samples of a block or more are freed in place and
        such packs are seldom rewritten; smaller samples leave dead ranges that holes cannot
        free, and compaction keeps them under the live bytes.
        """
        keep = np.ones(self.records.size, dtype=bool)
        if removed.size:
            keep[self.position(removed)] = False
        kept = self.records[keep]
        if compact_into is not None:
            kept = compacted(self.pack_dir, kept, compact_into, self.record_bytes)
        records = np.concatenate([kept, added.astype(fmt.RECORD)])
        if np.unique(records["id"]).size != records.size:
            raise fmt.StoreError(f"rank {self.rank}: an exchange would leave a sample twice in the store")
        fmt.write_json(self.directory / fmt.PREPARED, self._state(epoch, self.generation + 1, records))

    def can_punch_holes(self) -> bool:
        """Whether this store's file system frees punched ranges (probed once)."""
        if self._holes is None:
            self._holes = can_punch_holes(self.pack_dir)
        return self._holes

    def prepared_epoch(self) -> int | None:
        """The epoch of a pending prepared state, if any."""
        path = self.directory / fmt.PREPARED
        if not path.is_file():
            return None
        return fmt.manifest_value(fmt.read_json(path, "prepared state"), "epoch", int, path)

    def commit(self) -> None:
        """Phase 2: the prepared state becomes the committed one (one atomic rename); files only
        the old state used are deleted. Punching holes is left to :meth:`release_dead_space`."""
        prepared = self.directory / fmt.PREPARED
        # Parse before the rename, so a damaged prepared state never becomes the manifest.
        parse_state(fmt.read_json(prepared, "prepared state"), prepared, self.directory, self.rank, self.meta)
        os.replace(prepared, self.directory / fmt.MANIFEST)
        fmt.fsync_path(self.directory)
        before = self.records
        self._load(self.directory / fmt.MANIFEST)
        if self.dirty_packs is not None:
            gone = before[~np.isin(before["id"], self.records["id"])]
            self.dirty_packs.update(np.unique(gone["pack"]).tolist())
        self.remove_unreferenced()  # the old index and emptied packs: cheap unlinks

    def commit_first(self, epoch: int, records: np.ndarray) -> None:  # staging's first state
        fmt.write_json(self.directory / fmt.MANIFEST, self._state(epoch, 1, records))
        self._load(self.directory / fmt.MANIFEST)

    def discard_prepared(self) -> None:
        (self.directory / fmt.PREPARED).unlink(missing_ok=True)
        fmt.fsync_path(self.directory)

    def remove_unreferenced(self) -> int:
        """Delete pack, index and temporary files no state refers to; refuse foreign files."""
        leftovers = self.check_foreign()
        for path in leftovers:
            path.unlink()
        return sum(path.relative_to(self.directory).as_posix() != fmt.RESERVE_PATH for path in leftovers)

    def check_foreign(self) -> list[Path]:
        """StoreError naming any file that is not the store's own; else the store's own files no
        state refers to (left by an interrupted exchange, removable). Changes nothing."""
        wanted = self.referenced_files()
        foreign, leftovers = [], []
        for path in sorted(self.directory.rglob("*")):
            relative = path.relative_to(self.directory).as_posix()
            if relative in wanted or (path.is_dir() and relative == fmt.PACK_DIR):
                continue
            ours = (
                fmt.pack_sequence(path.name) is not None
                or fmt.index_generation(path.name) is not None
                or relative == fmt.RESERVE_PATH
            )
            if path.is_file() and (ours or path.name.endswith(".tmp")):
                leftovers.append(path)  # a reserve is no leftover: not counted as removed
            else:
                foreign.append(relative)
        if foreign:
            raise fmt.StoreError(
                f"rank {self.rank}: stray file(s) {', '.join(foreign)} in {self.directory} "
                "are not part of a store; remove them"
            )
        return leftovers

    # ----------------------------------------------------------------- space

    def release_dead_space(self) -> dict[str, int]:
        """Delete files no state refers to, then punch holes where samples left."""
        removed = self.remove_unreferenced()
        return {"removed_files": removed, "punched_bytes": self.punch_dead_ranges()}

    def punch_dead_ranges(self) -> int:
        """Free the blocks of dead ranges in packs that lost samples since the last call; returns
        the bytes in those ranges. Safe while the store is read or an exchange writes new packs:
        it touches only ranges no record uses (first punches cost ~0.2 ms each on ext4, so the
        exchanger runs this beside its transfers)."""
        if not self.can_punch_holes():
            return 0
        dirty, self.dirty_packs = self.dirty_packs, set()
        # self.records: one committed state, even if a commit happens meanwhile
        return punch_dead_ranges(self.pack_dir, self.records, dirty, root=self.directory)
