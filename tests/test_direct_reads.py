"""Reads around the page cache (reshuffle.store.direct): the same records as buffered reads, every
damage named, nothing of one read leaking into the next, and forked workers reading on their own
rings. Each batch is read cold (its packs dropped from the page cache), as a store bigger than
memory is; where this machine cannot read directly (no liburing, a file system without
O_DIRECT), the tests hold the fallback to the same promises and say why it fell back."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from reshuffle import ShuffledData, ShufflePlanner
from reshuffle.data.synthetic import load_synthetic
from reshuffle.store import CorruptSampleError, RankStore, direct, stage
from reshuffle.store import format as fmt
from reshuffle.store.direct import DEPTH, SETTING, wanted
from spawn import run_ranks

SAMPLE = 20_000  # bytes: a body (16 KiB and more) a head_size may split off


def _head_size(head: bytes) -> int | None:
    return 100 if head[:1] != b"\xff" else None  # some records whole, most split


def _store(root: Path, direct: str, monkeypatch) -> RankStore:
    monkeypatch.setenv(SETTING, direct)
    return RankStore.open(root, 0)


@pytest.fixture
def root(tmp_path) -> Path:
    source = load_synthetic("train", num_samples=300, sample_bytes=SAMPLE)
    planner = ShufflePlanner(300, 1, strategy="local", seed=3)
    stage(tmp_path / "store", 0, source, planner, max_pack_bytes=2_000_000)  # 3-4 packs
    return tmp_path / "store"


def _cold(root: Path, rank: int = 0) -> None:
    """Drop the packs from the page cache, so the reader's probe finds the batch on the disk."""
    os.sync()
    for pack in (root / fmt.rank_dir_name(rank) / fmt.PACK_DIR).glob("pack-*.bin"):
        descriptor = os.open(pack, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def _can_read_directly(root: Path) -> bool:
    if importlib.util.find_spec("liburing") is None:
        return False
    pack = next((root / "rank-00000" / fmt.PACK_DIR).glob("pack-*.bin"))
    try:
        os.close(os.open(pack, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


def _read(store: RankStore, ids, head_size=None) -> list:
    return list(store.read_many(np.asarray(ids, dtype=np.int64), head_size))


def _assert_direct_ran(store: RankStore, root: Path) -> None:
    direct = store.reader._direct
    assert direct is not None
    if _can_read_directly(root):
        assert direct.off is None and direct._generation > 0
    else:  # the fallback says why
        assert direct.off


def test_direct_reads_give_the_records_buffered_reads_give(root, monkeypatch):
    buffered, direct = _store(root, "0", monkeypatch), _store(root, "1", monkeypatch)
    assert not buffered.reader.around_page_cache
    rng = np.random.default_rng(0)
    for batch in range(8):
        ids = rng.choice(buffered.ids, size=DEPTH + 29, replace=False)  # more than in flight at once
        head_size = _head_size if batch % 2 else None
        expected = _read(buffered, ids, head_size)
        _cold(root)
        assert _read(direct, ids, head_size) == expected
        assert any(isinstance(r, tuple) for r in expected) == bool(head_size)
    _assert_direct_ran(direct, root)


def test_records_the_page_cache_holds_are_read_from_it(root, monkeypatch):
    """A batch that goes to the disk reads around the page cache only what the cache does not hold."""
    buffered, direct = _store(root, "0", monkeypatch), _store(root, "1", monkeypatch)
    ids = direct.ids[:60]
    _cold(root)
    _read(direct, ids[:1])  # the packs open
    reads = direct.reader._direct
    before = reads._tag  # reads around the cache so far
    expected = _read(buffered, ids[20:40])  # now cached
    assert _read(direct, ids) == _read(buffered, ids[:20]) + expected + _read(buffered, ids[40:])
    _assert_direct_ran(direct, root)
    if _can_read_directly(root) and reads._asks:  # cachestat(2) answers (Linux 6.5+)
        assert 30 <= reads._tag - before <= 40  # the 20 cached records were not among them


def test_a_damaged_record_read_directly_is_named_before_it_is_returned(root, monkeypatch):
    clean = _store(root, "0", monkeypatch)
    bad = int(clean.ids[len(clean.ids) // 2])
    record = clean.records[clean.position(bad)[0]]
    pack = root / "rank-00000" / fmt.PACK_DIR / fmt.pack_name(int(record["pack"]))
    with open(pack, "r+b") as handle:
        handle.seek(int(record["offset"]) + SAMPLE // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x10]))
    direct = _store(root, "1", monkeypatch)
    ids = [int(i) for i in clean.ids[:40] if i != bad] + [bad]
    _cold(root)
    reads = direct.read_many(np.asarray(ids, dtype=np.int64), _head_size)
    got: list = []
    with pytest.raises(CorruptSampleError, match=f"sample {bad} in this rank's own store is damaged"):
        got.extend(reads)  # keeps what came before the error
    assert len(got) == len(ids) - 1  # every sample before it, none after
    assert json.loads((root / "rank-00000" / fmt.DAMAGED).read_text())["id"] == bad
    _assert_direct_ran(direct, root)


def test_a_truncated_pack_read_directly_is_named(root, monkeypatch):
    clean = _store(root, "0", monkeypatch)
    last = clean.records[clean.records["offset"].argmax()]
    pack = root / "rank-00000" / fmt.PACK_DIR / fmt.pack_name(int(last["pack"]))
    os.truncate(pack, int(last["offset"]) + SAMPLE // 3)
    direct = _store(root, "1", monkeypatch)
    _cold(root)
    with pytest.raises(CorruptSampleError, match=f"sample {int(last['id'])} .*its pack is truncated"):
        _read(direct, [int(i) for i in clean.ids[:10]] + [int(last["id"])])


def test_a_read_left_unfinished_leaks_nothing_into_the_next(root, monkeypatch):
    buffered, direct = _store(root, "0", monkeypatch), _store(root, "1", monkeypatch)
    first, second, third = (buffered.ids[i : i + 60] for i in (0, 100, 200))
    _cold(root)
    left = direct.read_many(first)
    started = [next(left) for _ in range(5)]  # reads of the rest in flight into the same slots
    assert _read(direct, second) == _read(buffered, second)
    _cold(root)
    assert started + list(left) == _read(buffered, first)  # resumed after another read: still exact
    _cold(root)
    abandoned = direct.read_many(third)
    next(abandoned)
    del abandoned  # dropped mid-batch: its reads land before the next begins
    _cold(root)
    assert _read(direct, third) == _read(buffered, third)
    _assert_direct_ran(direct, root)


def _forked_read(store: RankStore, ids: np.ndarray, root: Path) -> tuple[list, str | None, int]:
    _cold(root)
    records = list(store.read_many(ids))
    return records, store.reader._direct.off, store.reader._direct._generation


def test_forked_workers_read_directly_on_rings_of_their_own(root, monkeypatch):
    buffered, direct = _store(root, "0", monkeypatch), _store(root, "1", monkeypatch)
    _cold(root)
    _read(direct, direct.ids[:50])  # the parent's ring exists before the fork
    batches = [direct.ids[i : i + 70] for i in (50, 120)]
    context = multiprocessing.get_context("fork")
    with context.Pool(2) as pool:
        results = pool.starmap(_forked_read, [(direct, ids, root) for ids in batches])
    for ids, (records, off, generation) in zip(batches, results, strict=True):
        assert records == _read(buffered, ids)
        if _can_read_directly(root):
            assert off is None and generation == 1  # its own ring, built on its first read
    assert _read(direct, direct.ids[:50]) == _read(buffered, direct.ids[:50])  # the parent's still reads


def test_which_stores_are_read_around_the_page_cache(monkeypatch):
    monkeypatch.setenv(SETTING, "auto")
    assert not wanted(1 << 20)  # fits in memory: its later epochs read from the page cache
    assert wanted(1 << 60)  # larger than any machine's memory
    monkeypatch.setattr(direct, "memory_available", lambda: 1000)
    assert not wanted(1000)  # fits: its later epochs read from the page cache
    assert wanted(1001)
    monkeypatch.setattr(direct, "memory_available", lambda: None)
    assert not wanted(1 << 60)  # the kernel does not say: buffered
    monkeypatch.setenv(SETTING, "0")
    assert not wanted(1 << 60)
    monkeypatch.setenv(SETTING, "1")
    assert wanted(1)
    monkeypatch.setenv(SETTING, "yes")
    with pytest.raises(ValueError, match=f"{SETTING} must be auto .* got 'yes'"):
        wanted(1)


def test_the_stores_of_ranks_on_one_host_count_together(root, monkeypatch):
    """A store that fits in memory alone, beside another as large on the same host that together
    do not, is read around the page cache; its next committed state too."""
    monkeypatch.setenv(SETTING, "auto")
    size = int(RankStore.open(root, 0).reader.lengths.sum())
    monkeypatch.setattr(direct, "memory_available", lambda: int(1.5 * size))
    store = RankStore.open(root, 0)
    assert not store.reader.around_page_cache and store.ranks_sharing_memory == 1
    store.share_memory(2)
    assert store.reader.around_page_cache
    ids = store.reader.ids[:40]
    _cold(root)
    assert _read(store, ids) == _read(_store(root, "0", monkeypatch), ids)
    _assert_direct_ran(store, root)
    monkeypatch.setenv(SETTING, "auto")
    store._load(store.directory / fmt.MANIFEST)  # the next committed state keeps the host's count
    assert store.reader.around_page_cache
    store.share_memory(1)
    assert not store.reader.around_page_cache


class Blobs:
    """Item ``i``: ``SAMPLE`` bytes that name it, and a label."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> tuple[bytes, int]:
        return bytes([index]) * SAMPLE, index % 3


def _rank_beside_another(rank: int, world: int, store_dir: str) -> tuple[int, bool, bool, bool]:
    """One rank of a job whose host has memory for one rank's store, not for both: (ranks on
    the host, whether its store alone would be read around the page cache, whether it is, whether
    a cold read of its samples gave them intact, directly or saying why not)."""
    os.environ[SETTING] = "auto"
    direct.memory_available = lambda: int(0.75 * len(Blobs()) * SAMPLE)  # type: ignore[assignment]
    data = ShuffledData(Blobs(), store_dir, strategy="local", seed=0, epochs=1)
    data.set_epoch(0)
    store = data.store
    assert store is not None
    alone, reads = wanted(int(store.reader.lengths.sum())), store.reader._direct
    _cold(Path(store_dir), rank)
    ids = list(data.sampler)
    items = data.dataset.__getitems__(ids)  # type: ignore[attr-defined]
    intact = all(blob == bytes([i]) * SAMPLE for i, (blob, _) in zip(ids, items, strict=True))
    read = reads is not None and (reads._generation > 0 or bool(reads.off))
    data.close()
    return store.ranks_sharing_memory, alone, reads is not None, intact and read


def test_ranks_on_one_host_read_around_the_page_cache_that_holds_one_store_not_both(tmp_path):
    for sharing, alone, around, read in run_ranks(_rank_beside_another, 2, str(tmp_path / "s"), timeout=120):
        assert (sharing, alone, around, read) == (2, False, True, True)


def test_threads_of_one_process_read_exact_records_beside_each_other(root, monkeypatch):
    """One ring per process: the first thread reads with it, any other through the page cache."""
    buffered, direct = _store(root, "0", monkeypatch), _store(root, "1", monkeypatch)
    batches = [buffered.ids[i : i + 50] for i in range(0, 300, 50)]
    expected = [_read(buffered, ids) for ids in batches]
    _cold(root)
    with ThreadPoolExecutor(3) as pool:
        for _ in range(3):
            assert list(pool.map(lambda ids: _read(direct, ids), batches)) == expected
            _cold(root)
    _assert_direct_ran(direct, root)
