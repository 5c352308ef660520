"""Staging: each rank copies its share of the source dataset into its own store, once.

What a job does before training in store mode, like copying a partition to node-local SSD.
Staging a complete store again is a no-op that says so; a staging interrupted half-way leaves
no manifest, so the next attempt starts that rank over.
"""

from __future__ import annotations

import multiprocessing
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from numpy.typing import NDArray

from reshuffle.data.source import SampleSource
from reshuffle.plan import ShufflePlanner
from reshuffle.store import format as fmt
from reshuffle.store.checksum import DEFAULT, checksum
from reshuffle.store.meta import StoreMeta, read_meta
from reshuffle.store.packs import MAX_PACK_BYTES
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
    stage_records(store, epoch, read_source(source, ids, store.meta.checksum), max_pack_bytes)
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
# READ_IN_WORKERS_FROM samples: the source's reads (small files, decoding a user's item) overlap
# each other and the pack writes; more workers than cores, since they mostly wait on the disk
# (docs/benchmarks.md, "Reading the scale table"). Processes, not threads: a user's dataset need
# not be thread-safe, and DataLoader workers are what it is written for.
STAGE_WORKERS = 8
STAGE_BATCH = 64
READ_IN_WORKERS_FROM = 4096


# The staging workers only read the source and checksum bytes: forked, they start at once. A rank
# started by multiprocessing's spawn (torch.multiprocessing.spawn) would otherwise spawn them too,
# each importing torch afresh: measured, 8.5 s of an 11.6 s staging of 1 GB.
WORKER_START = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


def direct_after() -> int | None:
    """How many bytes a rank stages through the page cache before it writes its packs around it
    (:mod:`reshuffle.store.direct`): half of what the page cache can take now (``MemAvailable``).
    A store that fits stays cached for its first epoch; beyond that, cached pages would be evicted
    before an epoch reads them, and copying into them costs the staging process CPU (measured:
    4.2 GB from a warm source, 450-555 MB/s through the cache, 731-775 around it). None where the
    memory is unknown (not Linux): always through the page cache."""
    try:
        with open("/proc/meminfo") as meminfo:
            kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    return kib * 1024 // 2


def read_source(
    source: SampleSource, ids: NDArray[np.int64], checksum_name: str
) -> Iterator[tuple[int, int, bytes | memoryview, int | None]]:
    """``(id, label, stored bytes, checksum or None)`` of ``ids``, in order; read (and
    checksummed) in DataLoader workers when there are many."""
    if ids.size < READ_IN_WORKERS_FROM:
        for i in ids.tolist():
            yield i, int(source.targets[i]), source.raw(i), None
        return
    from torch.utils.data import DataLoader, Dataset

    with warnings.catch_warnings():  # more workers than cores on purpose: they wait on the disk
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        loader: DataLoader[Any] = DataLoader(
            cast(Dataset[Any], _Raw(source, checksum_name)), sampler=ids.tolist(), batch_size=STAGE_BATCH,
            num_workers=STAGE_WORKERS, prefetch_factor=4, collate_fn=_packed,
            multiprocessing_context=WORKER_START,
        )  # fmt: skip
        batches = iter(loader)
    position = 0
    for payload, lengths, checksums in batches:
        data, start = memoryview(payload.numpy()), 0
        for length, crc in zip(lengths.tolist(), checksums.tolist(), strict=True):
            i = int(ids[position])
            yield i, int(source.targets[i]), data[start : start + length], crc
            start += length
            position += 1


class _Raw:
    """A source's stored bytes as a map-style dataset (what staging's DataLoader workers read)."""

    def __init__(self, source: SampleSource, checksum_name: str) -> None:
        self.source = source
        self.checksum = checksum(checksum_name)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[bytes, int]:
        raw = self.source.raw(int(index))
        return raw, self.checksum(raw)


def _packed(items: list[tuple[bytes, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of samples as one uint8 tensor and their lengths: a tensor reaches the main
    process through shared memory (bytes would go through a pipe, and a tensor per sample would
    pay a shared-memory segment each). The tensor is made in shared memory and the samples copied
    into it once: a private buffer would be zeroed, filled, then copied into shared memory when
    the DataLoader sends it (three passes over the bytes instead of one)."""
    total = sum(len(raw) for raw, _ in items)
    payload = torch.empty(0, dtype=torch.uint8)
    if total:
        payload.set_(torch.UntypedStorage._new_shared(total))  # torch.multiprocessing's own allocation
        view, start = payload.numpy().data, 0
        for raw, _ in items:
            view[start : start + len(raw)] = raw
            start += len(raw)
    lengths = torch.tensor([len(raw) for raw, _ in items], dtype=torch.int64)
    return payload, lengths, torch.tensor([crc for _, crc in items], dtype=torch.int64)


def stage_records(
    store: RankStore,
    epoch: int,
    samples: Iterable[tuple[int, int, bytes | memoryview, int | None]],
    max_pack_bytes: int,
) -> None:
    """Write ``(id, label, bytes, checksum or None)`` samples as the store's first committed state."""
    writer = store.pack_writer(max_pack_bytes, direct_after=direct_after())
    try:
        for sample_id, label, payload, crc in samples:
            writer.append(sample_id, label, payload, crc)
        records = writer.close()
    except BaseException as error:
        writer.abort()  # a full disk is not left full by this rank's partial pack
        if isinstance(error, OSError):
            raise describe_failure(error, store.rank, store.directory, "staging") from error
        raise
    store.commit_first(epoch, records)
