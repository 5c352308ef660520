"""Rank stores in one process: format, staging, two-phase commits, space, damage, verification."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from reshuffle import ShufflePlanner
from reshuffle.cli import main
from reshuffle.data import SourceDataset
from reshuffle.data.dataset import collate
from reshuffle.data.synthetic import load_synthetic
from reshuffle.data.transforms import build_transform
from reshuffle.store import RankStore, StoreDataset, StoreError, stage, store_meta, verify_store
from reshuffle.store.format import pack_name
from reshuffle.store.space import allocated_bytes
from reshuffle.store.verify import open_verified
from stores import WORLD, prepare_moves, run_partial_epochs, staged


def test_staging_writes_each_ranks_share_and_a_second_run_is_a_no_op(tmp_path):
    source, planner, stores = staged(tmp_path)
    for store in stores:
        assert np.array_equal(store.ids, planner.plan(0).holdings(store.rank))
        assert all(store.read(int(i)) == source.raw(int(i)) for i in store.ids)
    _, message = stage(tmp_path, 1, source, planner)
    assert message == "rank 1: store already staged (epoch 0, 33 samples); nothing to do"
    assert verify_store(tmp_path) == []


def test_a_store_of_another_job_is_refused_with_the_reason(tmp_path):
    source, _, _ = staged(tmp_path)
    four = ShufflePlanner(100, 4, strategy="partial", fraction=0.2, seed=1)
    with pytest.raises(
        StoreError,
        match=r"written for world size 3, this job has 4; run with 3 ranks, or point the store directory",
    ):
        stage(tmp_path, 0, source, four)
    other_seed = ShufflePlanner(100, WORLD, strategy="partial", fraction=0.2, seed=2)
    with pytest.raises(StoreError) as error:
        RankStore.open(tmp_path, 0, store_meta(source, other_seed))
    message = str(error.value)  # only what differs, and the fix in the caller's terms
    assert "(plan.seed: 1 in the store, 2 in this job)" in message, message
    assert "store_dir= in ShuffledData, shuffle.store_dir in a config" in message
    assert "strategy" not in message and len(message) < 400, message


@pytest.mark.parametrize("names", [["normalize"], ["random-crop:2", "horizontal-flip", "normalize"]])
def test_store_dataset_serves_what_index_mode_serves(tmp_path, names):
    """Per sample or batched (``__getitems__`` + ``collate``), plain collate or ours, in workers or
    not: every path yields the same tensors."""
    source, planner, stores = staged(tmp_path, sample_bytes=784)
    transform = build_transform(names, [0.5], [0.25])
    order = planner.plan(0).indices(2).tolist()
    index_set, store_set = (
        SourceDataset(source, transform),
        StoreDataset(stores[2], source.decoder, transform),
    )
    for dataset in (index_set, store_set):
        dataset.set_epoch(3, seed=7)
    one_by_one = [
        tuple(default_collate([index_set[i] for i in order[start : start + 8]]))
        for start in range(0, len(order), 8)
    ]
    loaders = [
        DataLoader(index_set, batch_size=8, sampler=order),  # PyTorch's default collate
        DataLoader(index_set, batch_size=8, sampler=order, collate_fn=collate),
        DataLoader(store_set, batch_size=8, sampler=order, num_workers=2, collate_fn=collate),
        DataLoader(store_set, batch_size=8, sampler=order),
    ]
    for loader in loaders:
        for a, b in zip(one_by_one, loader, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_two_phase_commit_changes_nothing_until_every_rank_commits(tmp_path):
    source, _, stores = staged(tmp_path)
    moving = stores[0].ids[:5]
    prepare_moves(stores[:2], {(0, 1): moving}, epoch=1)
    assert [s.epoch for s in stores[:2]] == [0, 0]  # prepared, not committed
    assert any("is in flight (prepared, not committed)" in p for p in verify_store(tmp_path))
    stores[0].commit()
    stores[1].commit()
    assert not np.isin(moving, stores[0].ids).any() and np.isin(moving, stores[1].ids).all()
    assert all(stores[1].read(int(i)) == source.raw(int(i)) for i in moving)
    problems = verify_store(tmp_path)
    assert any(
        p.startswith("stale manifest: rank(s) [2] are at epoch(s) [0], the others at 1") for p in problems
    )


def test_discarding_a_prepared_state_and_its_orphans_restores_the_old_one(tmp_path):
    _, _, stores = staged(tmp_path)
    before = [s.ids.copy() for s in stores]
    prepare_moves(stores[:2], {(0, 1): stores[0].ids[:5]}, epoch=1)
    for store in stores:
        store.discard_prepared()
        store.remove_unreferenced()
    assert verify_store(tmp_path) == []
    assert all(np.array_equal(s.ids, b) for s, b in zip(stores, before, strict=True))


def test_dead_bytes_are_punched_where_the_file_system_can(tmp_path):
    sample, pack = 16 * 4096, 8 * 16 * 4096
    punched = 0
    source, commits = run_partial_epochs(tmp_path, 8, sample, pack)
    for stores in commits:
        punched += sum(store.release_dead_space()["punched_bytes"] for store in stores)
        live = len(stores[0]) * sample
        assert allocated_bytes(stores[0].directory) <= live + 2 * pack  # near live, not growing
    assert punched > 0
    assert verify_store(tmp_path) == []
    for store in stores:
        assert all(store.read(int(i)) == source.raw(int(i)) for i in store.ids)


def test_samples_smaller_than_a_block_do_not_pile_up_dead_space(tmp_path):
    # Holes cannot free the dead range of one 1000-byte sample inside a 4 KiB block: packs are
    # rewritten once half of the space they hold is dead, so the store stays near its live bytes
    # (without that rule it grew past 2x live within 15 epochs).
    sample, pack = 1000, 64 * 1024
    source, commits = run_partial_epochs(tmp_path, 20, sample, pack, num=1200)
    for epoch, stores in enumerate(commits, start=1):
        for store in stores:
            store.release_dead_space()
        live = sum(len(store) * sample for store in stores)
        held = sum(allocated_bytes(store.pack_dir) for store in stores)
        assert held <= 1.6 * live + 2 * pack, (epoch, held / live)
    assert verify_store(tmp_path) == []
    for store in stores:
        assert all(store.read(int(i)) == source.raw(int(i)) for i in store.ids)


def test_without_holes_mostly_dead_packs_are_rewritten(tmp_path, monkeypatch):
    monkeypatch.setattr("reshuffle.store.rank_store.can_punch_holes", lambda directory: False)
    sample, pack = 16 * 4096, 8 * 16 * 4096
    original = None
    source, commits = run_partial_epochs(tmp_path, 8, sample, pack)
    for stores in commits:
        if original is None:
            original = {p.name for p in stores[0].pack_dir.glob("pack-*.bin")}
        assert stores[0].release_dead_space()["punched_bytes"] == 0
        live = len(stores[0]) * sample
        assert allocated_bytes(stores[0].directory) <= 2 * live + 2 * pack  # packs stay >= half live
    remaining = {p.name for p in stores[0].pack_dir.glob("pack-*.bin")}
    assert original - remaining  # some of the staged packs were rewritten and deleted
    assert verify_store(tmp_path) == []
    for store in stores:
        assert all(store.read(int(i)) == source.raw(int(i)) for i in store.ids)


def test_reserved_space_becomes_the_next_pack_and_is_never_a_problem(tmp_path):
    source, _, stores = staged(tmp_path, sample_bytes=4096)
    store = stores[0]
    reserved = store.reserve(10 * 4096)
    reserve = store.pack_dir / "reserve.bin"
    if reserved == 0:  # a file system without fallocate: writes allocate as they go
        assert not reserve.exists()
    else:
        assert reserved == 10 * 4096 and allocated_bytes(store.pack_dir) >= sum(
            p.stat().st_size for p in store.pack_dir.iterdir()
        )
    assert verify_store(tmp_path) == []  # between exchanges a reserve is expected, not stray
    writer = store.pack_writer(reserved=True)
    moved = [int(i) for i in stores[1].ids[:3]]
    for i in moved:
        writer.append(i, stores[1].label(i), stores[1].read(i))
    added = writer.close()
    assert not reserve.exists()  # it became the pack: cut to what was written
    assert (store.pack_dir / pack_name(int(added["pack"][0]))).stat().st_size == 3 * 4096
    store.prepare(1, np.empty(0, dtype=np.int64), added)
    store.commit()
    assert [store.read(i) for i in moved] == [source.raw(i) for i in moved]
    store.reserve(4096)
    assert store.remove_unreferenced() == 0 and not reserve.exists()  # removed, not a leftover


@pytest.mark.parametrize("kind", ["crc32", "crc32c"])
def test_stores_of_either_checksum_are_checked_on_read_and_exchange(tmp_path, kind, monkeypatch):
    """New stores carry CRC32 (zlib-ng's; the values of zlib.crc32, store.json names none, as
    before CRC32C); stores staged with CRC32C (store.json says so) keep reading. Either kind is
    checked on every read, and a sample sent from a store of one kind lands in a store of the
    other with the receiver's own checksum."""
    import importlib
    import zlib

    import crc32c

    from reshuffle.store.reads import CorruptSampleError
    from reshuffle.store.wire import IncomingStream, OutgoingStream

    expected = {"crc32": zlib.crc32, "crc32c": crc32c.crc32c}
    staging = importlib.import_module("reshuffle.store.stage")
    with monkeypatch.context() as patch:
        patch.setattr(staging, "DEFAULT", kind)  # what the version that wrote the store chose
        source, _, _ = staged(tmp_path / "theirs", num=60, world=1)
    store = RankStore.open(tmp_path / "theirs", 0)  # reopened by this version
    meta = json.loads((tmp_path / "theirs" / "store.json").read_text())
    assert meta.get("checksum") == (None if kind == "crc32" else "crc32c")
    for record in store.records:
        payload = store.read(int(record["id"]))
        assert payload == source.raw(int(record["id"]))
        assert int(record["crc"]) == expected[kind](payload)
    other = "crc32c" if kind == "crc32" else "crc32"
    with monkeypatch.context() as patch:
        patch.setattr(staging, "DEFAULT", other)
        _, _, (mine,) = staged(tmp_path / "mine", num=60, world=1)
    ids = store.ids[:20]
    wire = bytearray(OutgoingStream(store, ids).size)
    OutgoingStream(store, ids).take(len(wire), memoryview(wire))
    writer = mine.pack_writer()
    sink = IncomingStream(0, ids, len(wire), source.num_classes, writer)
    sink.feed(memoryview(bytes(wire)))
    sink.finish()
    landed = writer.close()
    assert [int(crc) for crc in landed["crc"]] == [expected[other](source.raw(int(i))) for i in landed["id"]]
    damage_flip(None, [None, None, store])
    with pytest.raises(CorruptSampleError, match=f"sample {int(store.records[4]['id'])} .* damaged"):
        store.read(int(store.records[4]["id"]))
    with pytest.raises(CorruptSampleError, match=f"sample {int(store.records[4]['id'])} .* damaged"):
        store.samples(store.ids[::-1].copy())  # a batch's rows, checked at once


@pytest.mark.parametrize("kind", ["crc32", "crc32c"])
def test_a_batch_of_equal_rows_is_checked_in_one_call_and_any_damaged_row_found(kind, monkeypatch):
    """A batch of equal-length rows is checked with one checksum call over the whole batch
    against the rows' recorded CRCs folded together (RowChecks); it matches exactly when every
    row does, at any batch size (in parts of MOST_ROWS), row length, and for a flipped bit in any
    row or a swapped pair of rows, and the row it names is the first damaged one."""
    from reshuffle.store import checksum
    from reshuffle.store.checksum import CHECKSUMS, RowChecks, first_bad

    monkeypatch.setattr(checksum, "MOST_ROWS", 16)

    check = CHECKSUMS[kind]
    rng = np.random.default_rng(0)
    for length in (1, 3, 784, 5000):
        checks = RowChecks(check, length)
        for size in (1, 2, 7, 64, 65, 3):  # grows its tables, then reuses them
            rows = rng.integers(0, 256, (size, length), dtype=np.uint8)
            crcs = np.array([check(row) for row in rows], dtype=np.int64)
            assert checks.matches(rows, crcs) and first_bad(check, rows, crcs) is None
            for _ in range(5):
                bad = rows.copy()
                row, at, bit = rng.integers(size), rng.integers(length), rng.integers(8)
                bad[row, at] ^= np.uint8(1 << bit)
                assert not checks.matches(bad, crcs) and first_bad(check, bad, crcs) == row
            if size > 1 and not np.array_equal(rows[0], rows[1]):
                swapped = rows[[1, 0, *range(2, size)]]
                assert not checks.matches(swapped, crcs) and first_bad(check, swapped, crcs) == 0


def first_pack(store):
    return sorted(store.pack_dir.glob("pack-*.bin"))[0]


def damage_truncate(root, stores):
    path = first_pack(stores[1])
    path.write_bytes(path.read_bytes()[:-10])
    return r"rank 1: pack packs/pack-00000001\.bin is truncated \(\d+ bytes, manifest says \d+\)"


def damage_flip(root, stores):
    record = stores[2].records[4]
    path = stores[2].pack_dir / f"pack-{int(record['pack']):08d}.bin"
    data = bytearray(path.read_bytes())
    data[int(record["offset"]) + 7] ^= 0xFF
    path.write_bytes(bytes(data))
    return rf"rank 2: 1 corrupt sample\(s\) \(checksum mismatch\): ids {int(record['id'])}"


def damage_manifest(root, stores):
    (stores[0].directory / "manifest.json").unlink()
    return r"rank 0: manifest .*rank-00000/manifest\.json is missing"


def damage_stray(root, stores):
    (stores[1].directory / "notes.txt").write_text("hello")
    return r"rank 1: stray file notes\.txt \(not part of a store\); remove it"


def damage_index(root, stores):
    index = next(stores[0].directory.glob("index-*.bin"))
    index.write_bytes(index.read_bytes()[:-40] + bytes(40))
    return r"rank 0: index .* is corrupt \(its checksum does not match the manifest\)"


def damage_missing_rank(root, stores):
    for path in sorted(stores[2].directory.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    stores[2].directory.rmdir()
    return r"rank 2: directory rank-00002 is missing"


def damage_world_size(root, stores):
    (root / "rank-00003").mkdir()
    return (
        r"rank-00003: the store was written for world size 3; "
        r"this directory belongs to a store of another world size"
    )


def damage_duplicate(root, stores):
    prepare_moves(stores, {}, epoch=0)  # a re-prepare of epoch 0 on every rank ...
    writer = stores[1].pack_writer()
    sample = int(stores[0].ids[0])
    writer.append(sample, stores[0].label(sample), stores[0].read(sample))
    stores[1].prepare(
        0, np.empty(0, dtype=np.int64), writer.close()
    )  # ... where rank 1 gains rank 0's sample
    for store in stores:
        store.commit()
    return rf"duplicated: sample {sample} is held by ranks \[0, 1\]"


def damage_missing_sample(root, stores):
    sample = int(stores[2].ids[3])
    stores[2].prepare(0, np.array([sample]), np.empty(0, dtype=stores[2].records.dtype))
    stores[2].commit()
    return rf"missing: sample\(s\) {sample} are held by no rank"


@pytest.mark.parametrize(
    "damage",
    [damage_truncate, damage_flip, damage_manifest, damage_stray, damage_index, damage_missing_rank,
     damage_world_size, damage_duplicate, damage_missing_sample],
    ids=lambda f: f.__name__.removeprefix("damage_"),
)  # fmt: skip
def test_damage_is_named_by_verify_and_refused_at_open(tmp_path, damage, capsys):
    source, planner, stores = staged(tmp_path)
    expected = damage(tmp_path, stores)
    problems = verify_store(tmp_path)
    assert any(re.search(expected, p) for p in problems), problems
    assert main(["verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "problem:" in out and "problem(s)" in out
    rank_specific = {damage_truncate: 1, damage_flip: 2, damage_manifest: 0, damage_stray: 1, damage_index: 0}
    if damage in rank_specific:
        with pytest.raises(StoreError) as error:
            open_verified(tmp_path, rank_specific[damage], store_meta(source, planner))
        assert re.search(re.sub(r"^rank \d: ", "", expected), str(error.value)), error.value


def test_verify_passes_a_good_store_and_names_a_missing_one(tmp_path, capsys):
    staged(tmp_path / "store")
    assert main(["verify", str(tmp_path / "store")]) == 0
    assert "ok (every sample held exactly once, checksums intact)" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "nothing")]) == 1
    assert "is not a directory" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["verify", str(tmp_path / "empty")]) == 1
    assert "store.json" in capsys.readouterr().out


def test_verify_tells_an_exchange_in_flight_from_damage_by_exit_code(tmp_path, capsys):
    """A clean stop between an exchange's prepare and its commit: verify exits 3 and says the next
    start finishes it; the same store with a damaged sample as well exits 1."""
    _, _, stores = staged(tmp_path)
    prepare_moves(stores, {(0, 1): stores[0].ids[:3], (1, 0): stores[1].ids[:3]}, epoch=1)
    assert all(store.prepared_epoch() == 1 for store in stores)
    assert main(["verify", str(tmp_path)]) == 3
    out = capsys.readouterr().out
    assert "in flight: rank 0: an exchange into epoch 1 is in flight" in out
    assert "the next start of the job finishes it or rolls it back. Nothing is damaged." in out
    assert "problem:" not in out
    record = stores[2].records[0]
    pack = stores[2].pack_dir / pack_name(int(record["pack"]))
    data = bytearray(pack.read_bytes())
    data[int(record["offset"])] ^= 0xFF
    pack.write_bytes(bytes(data))
    assert main(["verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "problem: rank 2: 1 corrupt sample(s)" in out and "in flight: rank 0" in out


def test_store_paths_never_resolve_outside_the_store(tmp_path):
    _, _, stores = staged(tmp_path)
    manifest_path = stores[0].directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["index"] = "../../../etc/passwd"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"does not match generation|refusing store path"):
        RankStore.open(tmp_path, 0)
    # A pack replaced by a symlink that leads out of the store is refused when read.
    outside = tmp_path.parent / "outside.bin"
    outside.write_bytes(b"x" * 100_000)
    pack = first_pack(stores[1])
    pack.unlink()
    os.symlink(outside, pack)
    store = RankStore.open(tmp_path, 1)
    with pytest.raises(StoreError, match="resolves outside"):
        store.read(int(store.ids[0]))


def test_a_manifest_with_bad_fields_is_named(tmp_path):
    _, _, stores = staged(tmp_path)
    manifest_path = stores[1].directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["epoch"] = "three"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="field 'epoch' is missing or not a int"):
        RankStore.open(tmp_path, 1)
    manifest_path.write_text("{not json")
    with pytest.raises(StoreError, match="is unreadable"):
        RankStore.open(tmp_path, 1)


def test_a_large_staging_reads_the_source_in_workers_and_stores_it_exactly(tmp_path):
    """A rank staging READ_IN_WORKERS_FROM samples or more reads them in DataLoader workers, each
    writing its batches into packs of its own (checksums computed there): every sample lands
    intact, with the checksum the store's reads verify, in the plan's holdings."""
    from reshuffle.store.stage import READ_IN_WORKERS_FROM

    num = READ_IN_WORKERS_FROM + 123
    source = load_synthetic("train", num_samples=num, shape=(1, 4, 4), sample_bytes=64)
    planner = ShufflePlanner(num, 1, strategy="local", seed=2)
    store, _ = stage(tmp_path, 0, source, planner)
    assert np.array_equal(store.ids, np.arange(num))
    assert all(store.read(int(i)) == source.raw(int(i)) for i in range(0, num, 7))  # checked reads
    assert verify_store(tmp_path) == []


def test_staging_workers_roll_their_own_packs_without_sharing_one(tmp_path):
    """Each staging worker rolls its packs over at max_pack_bytes to sequences no other worker
    takes (first + worker, then + workers): records never point into another worker's pack, no
    pack outgrows the limit by more than a sample, and every sample reads back exactly."""
    import importlib

    staging = importlib.import_module("reshuffle.store.stage")  # the module, not its stage()
    num, size, limit = staging.READ_IN_WORKERS_FROM + 500, 700, 40_000
    source = load_synthetic("train", num_samples=num, shape=(1, 10, 10), sample_bytes=size)
    store, _ = stage(tmp_path, 0, source, ShufflePlanner(num, 1, strategy="local", seed=3),
                     max_pack_bytes=limit)  # fmt: skip
    records = store.records
    packs = sorted(store.pack_dir.glob("pack-*.bin"))
    assert len(packs) == np.unique(records["pack"]).size > staging.STAGE_WORKERS  # every worker rolled
    for path in packs:
        held = records[records["pack"] == int(path.stem.split("-")[1])]
        ends = np.sort(held["offset"] + held["length"])
        starts = np.sort(held["offset"])
        assert starts[0] == 0 and np.all(starts[1:] == ends[:-1])  # back to back, no sample overlaps
        assert path.stat().st_size == ends[-1] <= limit + len(source.raw(0))
    assert np.array_equal(store.ids, np.arange(num))
    assert all(store.read(int(i)) == source.raw(int(i)) for i in range(num))
    assert verify_store(tmp_path) == []


def test_a_staging_worker_that_fills_the_disk_leaves_no_pack_and_names_the_disk(tmp_path, monkeypatch):
    """A full disk met by one staging worker's pack write (its OSError's errno reaches the main
    process): the named StoreError, every worker ended, no pack left behind (the other workers'
    packs too), and the next staging succeeds."""
    import errno
    import multiprocessing

    from reshuffle.store import packs
    from reshuffle.store.stage import READ_IN_WORKERS_FROM

    num = READ_IN_WORKERS_FROM + 200
    source = load_synthetic("train", num_samples=num, shape=(1, 4, 4), sample_bytes=64)
    planner = ShufflePlanner(num, 1, strategy="local", seed=2)
    append = packs.PackWriter.append

    def filling(self, sample_id, *args, **kwargs):  # forked workers inherit it
        if sample_id == num // 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return append(self, sample_id, *args, **kwargs)

    monkeypatch.setattr(packs.PackWriter, "append", filling)
    with pytest.raises(StoreError, match=r"staging failed: no space left on the disk holding .*Free space"):
        stage(tmp_path, 0, source, planner)
    assert not multiprocessing.active_children()
    assert not list((tmp_path / "rank-00000" / "packs").glob("pack-*.bin"))
    monkeypatch.setattr(packs.PackWriter, "append", append)
    store, _ = stage(tmp_path, 0, source, planner)
    assert len(store) == num and verify_store(tmp_path) == []
