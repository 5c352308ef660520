"""Staging: each rank copies its share of the source dataset into its own store, once.

What a job does before training in store mode, like copying a partition to node-local SSD.
Staging a complete store again is a no-op that says so; a staging interrupted half-way leaves
no manifest, so the next attempt starts that rank over.
"""

from __future__ import annotations

import multiprocessing
import time
import warnings
from pathlib import Path
from typing import Any, NoReturn, cast

import numpy as np
from numpy.typing import NDArray

from reshuffle.data.source import SampleSource
from reshuffle.plan import ShufflePlanner
from reshuffle.store import format as fmt
from reshuffle.store.checksum import DEFAULT
from reshuffle.store.meta import StoreMeta, read_meta
from reshuffle.store.packs import MAX_PACK_BYTES, PackWriter
from reshuffle.store.rank_store import RankStore
from reshuffle.store.wire import describe_failure


def store_meta(
    source: SampleSource, planner: ShufflePlanner, dataset: dict[str, Any] | None = None
) -> StoreMeta:
    """The description a store of ``source`` planned by ``planner`` carries."""
    return StoreMeta(
        world_size=planner.world_size,
        num_samples=planner.num_samples,
        num_classes=int(source.num_classes),
        dataset=dataset if dataset is not None else {"name": source.name, "split": source.split},
        plan=planner.config,
        checksum=DEFAULT,
    )


def prepare_root(root: Path, meta: StoreMeta) -> StoreMeta:
    """``root`` as a store directory of ``meta``'s job: created with its ``store.json``, or
    checked against the one it holds (StoreError: another job's store, or not writable).
    Returns the description in force: the one ``root`` already held (its checksum), else ``meta``."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        if (root / fmt.STORE_FILE).is_file():
            written = read_meta(root)
            if why := meta.mismatch(written):
                raise fmt.StoreError(f"store {root}: {why}")
            return written
        fmt.write_json(root / fmt.STORE_FILE, meta.to_json())
        return meta
    except OSError as error:  # a file in the way, a read-only disk, no permission
        raise fmt.StoreError(
            f"cannot use {root} as a store directory ({error.strerror}: {error.filename or root}); set "
            "shuffle.store_dir (or store_dir=) to a writable directory on a node-local disk"
        ) from error


def stage(
    root: str | Path,
    rank: int,
    source: SampleSource,
    planner: ShufflePlanner,
    epoch: int = 0,
    *,
    dataset: dict[str, Any] | None = None,
    max_pack_bytes: int = MAX_PACK_BYTES,
) -> tuple[RankStore, str]:
    """Write ``rank``'s holdings of ``epoch`` from ``source`` into its store under ``root``.

    Returns the opened store and a line saying what happened.

    Raises:
        StoreError: ``root`` holds a store of another job (world size, dataset or plan).
    """
    root = Path(root)
    if len(source) != planner.num_samples:
        raise fmt.StoreError(
            f"the source has {len(source)} samples but the plan is for {planner.num_samples}"
        )
    meta = prepare_root(root, store_meta(source, planner, dataset))
    store = RankStore(root, rank, meta)
    lock = fmt.lock_directory(store.directory)  # held for the life of this process (the job)
    if (store.directory / fmt.MANIFEST).is_file():
        store = RankStore.open(root, rank, meta)
        store.lock = lock
        store.check_foreign()  # refused before recovery changes anything
        store.check_damage()
        check_labels(store, source.targets)
        return (
            store,
            f"rank {rank}: store already staged (epoch {store.epoch}, {len(store)} samples); nothing to do",
        )
    store.lock = lock
    store.pack_dir.mkdir(parents=True, exist_ok=True)
    store.remove_unreferenced()  # a previous staging that died half-way
    started = time.perf_counter()
    ids = planner.plan(epoch).holdings(rank)
    store.commit_first(epoch, write_packs(store, source, ids, max_pack_bytes))
    size = int(store.records["length"].sum())
    return store, (
        f"rank {rank}: staged {len(store)} samples ({size / 2**20:.1f} MiB) for epoch {epoch} "
        f"in {time.perf_counter() - started:.1f} s"
    )


def committed_epoch(root: Path, rank: int) -> int:
    """The epoch of ``rank``'s committed store under ``root``; -1 when it has none (or unreadable)."""
    path = root / fmt.rank_dir_name(rank) / fmt.MANIFEST
    try:
        return int(fmt.manifest_value(fmt.read_json(path, "manifest"), "epoch", int, path))
    except fmt.StoreError:
        return -1


def check_labels(store: RankStore, labels: np.ndarray) -> None:
    """Refuse a store whose index gives a sample another label than the dataset does (an index
    altered on disk: training on it would be silently wrong)."""
    held = store.ids
    expected = np.asarray(labels, dtype=np.int64)[held]
    wrong = np.flatnonzero(store.records["label"] != expected)
    if wrong.size:
        shown = ", ".join(
            f"{int(held[w])} ({int(store.records['label'][w])} stored, {int(expected[w])} in the dataset)"
            for w in wrong[:5]
        )
        raise fmt.StoreError(
            f"rank {store.rank}: {wrong.size} sample(s) in {store.directory} carry another label than "
            f"the dataset gives them: {shown}; the store's index is damaged: restage it (remove the "
            "store and start again)"
        )


# Staging reads the source through this many DataLoader workers once a rank stages at least
# READ_IN_WORKERS_FROM samples, each worker writing what it read into packs of its own: the
# source's reads (small files, decoding a user's item) overlap each other and the pack writes, and
# no sample's bytes pass through the main process (docs/benchmarks.md, "Reading the scale
# table"). More workers than cores, since they mostly wait on the disk. Processes, not threads: a
# user's dataset need not be thread-safe, and DataLoader workers are what it is written for.
STAGE_WORKERS = 8
STAGE_BATCH = 64
READ_IN_WORKERS_FROM = 4096


# The staging workers only read the source and write packs: forked, they start at once. A rank
# started by multiprocessing's spawn (torch.multiprocessing.spawn) would otherwise spawn them too,
# each importing torch afresh: measured, 8.5 s of an 11.6 s staging of 1 GB.
WORKER_START = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


def write_packs(
    store: RankStore, source: SampleSource, ids: NDArray[np.int64], max_pack_bytes: int
) -> np.ndarray:
    """Write the samples ``ids`` of ``source`` into new packs of ``store``, durably; their records.
    On a failure nothing written is left (a full disk is not left full by this rank)."""
    if ids.size >= READ_IN_WORKERS_FROM:
        return _write_in_workers(store, source, ids, max_pack_bytes)
    writer = store.pack_writer(max_pack_bytes)
    try:
        for sample_id in ids.tolist():
            writer.append(sample_id, int(source.targets[sample_id]), source.raw(sample_id))
        return writer.close()
    except BaseException as error:
        writer.abort()
        _fail(error, store)


def _fail(error: BaseException, store: RankStore) -> NoReturn:
    """Raise ``error``; an ``OSError`` as the StoreError naming the disk and the fix."""
    if isinstance(error, OSError):
        raise describe_failure(error, store.rank, store.directory, "staging") from error
    raise error


def _write_in_workers(
    store: RankStore, source: SampleSource, ids: NDArray[np.int64], max_pack_bytes: int
) -> np.ndarray:
    """:func:`write_packs` by ``STAGE_WORKERS`` DataLoader workers, each appending its batches
    to packs of its own (sequences ``first + worker``, ``+ STAGE_WORKERS`` for each next one);
    this process collects the records and makes every pack durable at the end."""
    first = store.next_pack_sequence()
    packing = _Packing(source, store.pack_dir, store.directory, store.meta.checksum, first, max_pack_bytes)
    try:
        records = _records_of(packing, ids)
        for sequence in np.unique(records["pack"]).tolist():
            fmt.fsync_path(store.pack_dir / fmt.pack_name(sequence))
        fmt.fsync_path(store.pack_dir)
        return records
    except BaseException as error:
        for path in store.pack_dir.glob("pack-*.bin"):
            sequence = fmt.pack_sequence(path.name)
            if sequence is not None and sequence >= first:
                path.unlink(missing_ok=True)
        _fail(error, store)


def _records_of(packing: _Packing, ids: NDArray[np.int64]) -> np.ndarray:
    """The records of ``ids`` that staging's workers wrote, once they have all ended (on an
    error too: a worker still writing would leave a pack behind)."""
    from torch.utils.data import DataLoader, Dataset

    with warnings.catch_warnings():  # more workers than cores on purpose: they wait on the disk
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        loader: DataLoader[Any] = DataLoader(
            cast(Dataset[Any], packing), sampler=ids.tolist(), batch_size=STAGE_BATCH,
            num_workers=STAGE_WORKERS, prefetch_factor=4, collate_fn=_as_is,
            multiprocessing_context=WORKER_START,
        )  # fmt: skip
        batches, parts = iter(loader), []
    try:
        for part in batches:
            if isinstance(part, BaseException):  # a worker's OSError, its errno kept
                raise part
            parts.append(part)
    finally:
        del batches  # shuts the workers down (a traceback would keep the iterator alive)
    return np.concatenate(parts) if parts else np.empty(0, dtype=fmt.RECORD)


class _Packing:
    """Staging's map-style dataset: a batch of ids is read from the source and appended to this
    worker's own packs, in the worker; the batch's records are what it returns (an ``OSError``
    is returned, not raised, so that its errno reaches the main process: a DataLoader re-raises a
    worker's error as a new one of its type, without it)."""

    def __init__(
        self, source: SampleSource, pack_dir: Path, root: Path, checksum_name: str,
        first: int, max_bytes: int,
    ) -> None:  # fmt: skip
        self.source = source
        self.pack_dir, self.root, self.checksum_name = pack_dir, root, checksum_name
        self.first = first
        self.max_bytes = max_bytes
        self._writer: PackWriter | None = None

    def __len__(self) -> int:
        return len(self.source)

    def __getitems__(self, ids: list[int]) -> np.ndarray | OSError:
        try:
            writer = self._writer or self._open()
            for sample_id in ids:
                writer.append(sample_id, int(self.source.targets[sample_id]), self.source.raw(sample_id))
            return writer.flush_records()
        except OSError as error:
            return error

    def _open(self) -> PackWriter:
        from torch.utils.data import get_worker_info

        worker = get_worker_info()
        index, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        self._writer = PackWriter(
            self.pack_dir, self.first + index, self.max_bytes, root=self.root,
            checksum_name=self.checksum_name, stride=workers,
        )  # fmt: skip
        return self._writer


def _as_is(batch: Any) -> Any:
    return batch
