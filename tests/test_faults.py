"""Fault injection against store mode (issue 17): each test damages a store, a rank or a job the
way a campaign did, and checks that nothing is lost, nothing outside the store is touched, and
the error names the real cause and its fix."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from reshuffle import ShuffledData, ShufflePlanner
from reshuffle.data.synthetic import load_synthetic
from reshuffle.data.transforms import build_transform
from reshuffle.store import (
    CorruptSampleError,
    ExchangeError,
    RankStore,
    StoreDataset,
    StoreError,
    open_or_stage,
    stage,
    verify_store,
)
from reshuffle.store.dataset import StoreItems
from reshuffle.store.format import pack_name
from reshuffle.store.wire import OutgoingStream, PeerError, describe_failure
from reshuffle.train.checkpoint import Checkpoints
from reshuffle.train.launch import root_failure
from spawn import run_ranks
from stores import run_partial_epochs, staged

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _outside_copy(tmp_path, pack):
    """A file outside the store with the pack's bytes, and the pack replaced by a symlink to it."""
    outside = tmp_path / "outside" / "victim.bin"
    outside.parent.mkdir()
    outside.write_bytes(pack.read_bytes())
    pack.unlink()
    pack.symlink_to(outside)
    return outside


def test_hole_punching_never_writes_through_a_symlink_out_of_the_store(tmp_path):
    """A pack replaced by a symlink to a file outside the store: punching the dead ranges of that
    pack is refused by name, and the outside file keeps every byte."""
    sample, pack_bytes = 16 * 4096, 8 * 16 * 4096
    _, commits = run_partial_epochs(tmp_path / "store", 6, sample, pack_bytes)
    stores = next(commits)
    store = stores[0]  # just committed: its dead ranges not yet punched
    dirty = sorted(store.dirty_packs) if store.dirty_packs else sorted(set(store.records["pack"].tolist()))
    outside = _outside_copy(tmp_path, store.pack_dir / pack_name(dirty[0]))
    before = outside.read_bytes()
    with pytest.raises(StoreError, match=r"resolves outside .* \(a symlink\?\)"):
        store.release_dead_space()
    assert outside.read_bytes() == before


def test_reserved_space_is_never_written_through_a_symlink(tmp_path):
    """The reserve file (next exchange's space) planted as a symlink out of the store: reserving
    is refused by name, and a pack writer that would take it over refuses too."""
    _, _, stores = staged(tmp_path / "store", world=2)
    store = stores[0]
    target = tmp_path / "target.bin"
    target.write_bytes(b"keep me")
    (store.pack_dir / "reserve.bin").symlink_to(target)
    with pytest.raises(StoreError, match=r"resolves outside .* \(a symlink\?\)"):
        store.reserve(1 << 20)
    writer = store.pack_writer(reserved=True)
    with pytest.raises(StoreError, match=r"resolves outside|is a symlink"):
        writer.append(0, 0, b"x" * 100)
    writer.abort()
    assert target.read_bytes() == b"keep me"


def _flip(store, position=4, at=7):
    """Flip byte ``at`` of the sample at ``position`` on disk (None: its middle byte); its id."""
    record = store.records[position]
    path = store.pack_dir / pack_name(int(record["pack"]))
    data = bytearray(path.read_bytes())
    data[int(record["offset"]) + (int(record["length"]) // 2 if at is None else at)] ^= 0xFF
    path.write_bytes(bytes(data))
    return int(record["id"])


def test_a_damaged_sample_is_refused_by_every_read_and_the_store_after_it(tmp_path):
    """A flipped byte in a sample a rank keeps: the read that would train it (one item or a
    batch) raises CorruptSampleError naming the sample and this rank's own disk; the damage is
    recorded, so the store refuses further use (and verify names it) until it is restaged."""
    source, planner, stores = staged(tmp_path / "store", world=2)
    store = stores[1]
    bad = _flip(store)
    dataset = StoreDataset(store, source.decode, build_transform([], [0.5], [0.25]))
    good = int(store.ids[0])
    assert good != bad and dataset[good][1] == source.targets[good]
    store.check_damage()  # nothing found yet: nothing recorded
    with pytest.raises(
        CorruptSampleError, match=rf"rank 1: sample {bad} in this rank's own store is damaged"
    ):
        dataset[bad]
    with pytest.raises(CorruptSampleError, match="its disk, not a peer or the transfer"):
        dataset.__getitems__(store.ids[:20].tolist())
    with pytest.raises(CorruptSampleError, match=rf"a read found sample {bad} damaged"):
        store.check_damage()
    with pytest.raises(CorruptSampleError, match=rf"sample {bad} damaged .* restage the store"):
        stage(tmp_path / "store", 1, source, planner)  # reopening it for a job
    problems = verify_store(tmp_path / "store")
    assert any(f"sample {bad} damaged" in line for line in problems), problems
    assert any("1 corrupt sample(s)" in line and str(bad) in line for line in problems), problems
    stores[0].check_damage()  # the other rank's store is untouched


@pytest.mark.parametrize("vectored", [True, False], ids=["preadv", "pread"])
def test_a_batch_of_large_samples_is_read_into_its_rows_and_each_row_checked(tmp_path, monkeypatch, vectored):
    """Equal-length samples of 16 KiB and more come as one (B, L) array: neighbours in a pack in
    one read straight into their rows (runs cut at IOV_MAX buffers), every row checked, in any
    order the plan asks; a flipped byte anywhere in a row, or a pack cut short, is the named
    error. Without ``os.preadv`` (macOS before 11) the rows are read one by one."""
    from reshuffle.store import reads

    monkeypatch.setattr(reads, "IOV_MAX", 3)
    if not vectored:
        monkeypatch.delattr(os, "preadv")
    source, _, (store,) = staged(tmp_path / "store", num=40, sample_bytes=20_000, world=1)
    reader = store.reader
    where = np.array([5, 6, 7, 8, 9, 0, 30, 2, 3, 1, 39, 38], dtype=np.int64)  # runs and strays
    data, labels = reader.samples(where)
    assert data.shape == (where.size, 20_000)
    for row, position in enumerate(where.tolist()):
        sample_id = int(reader.ids[position])
        assert data[row].tobytes() == source.raw(sample_id) and labels[row] == source.targets[sample_id]
    bad = _flip(store, position=8, at=None)  # the middle of a row inside a run
    with pytest.raises(CorruptSampleError, match=rf"sample {bad} in this rank's own store is damaged"):
        reader.samples(where)
    pack = store.pack_dir / pack_name(int(store.records["pack"][-1]))
    os.truncate(pack, pack.stat().st_size - 10)
    reader = RankStore.open(tmp_path / "store", 0).reader
    with pytest.raises(CorruptSampleError, match="its pack is truncated"):
        reader.samples(np.array([0, 39], dtype=np.int64))


class Items(torch.utils.data.Dataset):
    """A user's dataset: (image, label, id) items."""

    def __init__(self) -> None:
        self.targets = [i % 5 for i in range(240)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return torch.full((8, 8), index % 251, dtype=torch.uint8), self.targets[index], index


def _epoch_over_a_store(rank, world, root, damage, workers):
    """Stage, close; ``damage`` rank 1's store on disk; reopen and train one epoch as a user's
    loop does (a DataLoader with ``workers``), then take the epoch's state."""
    data = ShuffledData(Items(), root, strategy="partial", fraction=0.25, seed=0)
    data.set_epoch(0)
    data.close()
    dist.barrier()
    bad = _flip(data.store, at=None) if damage and rank == 1 else None  # in the image's bytes
    dist.barrier()
    data = ShuffledData(Items(), root, strategy="partial", fraction=0.25, seed=0, timeout_s=30)
    data.set_epoch(0)
    loader = data.loader(batch_size=16, num_workers=workers)
    seen: list[int] = []
    result = {"bad": bad, "seen": seen, "error": None, "state_error": None}
    try:
        for _, _, ids in loader:
            seen += ids.tolist()
        data.end_epoch()
    except (ExchangeError, StoreError) as error:
        result.update(error=type(error).__name__, message=str(error))
    try:
        data.state_dict()
    except StoreError as error:
        result["state_error"] = str(error)
    return result


@pytest.mark.parametrize("workers", [0, 2])
def test_a_sample_damaged_on_disk_is_never_trained_and_no_state_describes_its_epoch(tmp_path, workers):
    """Through the public API, 2 gloo ranks: a sample flipped on rank 1's disk stops rank 1's
    loop on the read that would put it in a batch (in the DataLoader worker that reads it), naming
    the sample and its own disk; the sample is in no batch, and state_dict() refuses to describe
    the epoch; rank 0 learns that a peer failed; nothing commits. Without damage the epoch ends
    cleanly and its state is taken."""
    clean = run_ranks(_epoch_over_a_store, 2, str(tmp_path / "clean"), False, workers, timeout=120)
    assert all(r["error"] is None and r["state_error"] is None for r in clean)
    damaged = run_ranks(_epoch_over_a_store, 2, str(tmp_path / "damaged"), True, workers, timeout=150)
    rank0, rank1 = damaged
    assert rank1["error"] == "CorruptSampleError", rank1
    assert f"sample {rank1['bad']} in this rank's own store is damaged" in rank1["message"]
    assert rank1["bad"] not in rank1["seen"]
    assert rank1["state_error"] is not None and f"sample {rank1['bad']} damaged" in rank1["state_error"]
    assert rank0["error"] == "PeerError", rank0
    assert verify_store(tmp_path / "damaged") != []  # still at epoch 0: the damage is named, not moved


def test_a_damaged_sample_about_to_be_sent_is_blamed_on_the_senders_disk(tmp_path):
    """The sender reads what it sends through the same check: the error names its own store,
    not the transfer ("arrived corrupt") on the receiving rank."""
    _, _, stores = staged(tmp_path / "store", world=2)
    bad = _flip(stores[0])
    stream = OutgoingStream(stores[0], np.array([bad]))
    with pytest.raises(
        CorruptSampleError, match=rf"rank 0: sample {bad} in this rank's own store is damaged"
    ):
        stream.take(stream.size, memoryview(bytearray(stream.size)))


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_truncated_or_deleted_pack_is_a_named_error_not_a_crash(tmp_path, damage):
    source, _, stores = staged(tmp_path / "store", world=2)
    store = stores[0]
    pack = store.pack_dir / pack_name(int(store.records["pack"][-1]))
    if damage == "truncate":
        pack.write_bytes(pack.read_bytes()[:-10])
        why = "its pack is truncated"
    else:
        pack.unlink()
        why = "its pack is missing"
    last = store.records[store.records["pack"] == store.records["pack"][-1]]["id"]
    dataset = StoreDataset(store, source.decode, build_transform([], [0.5], [0.25]))
    with pytest.raises(CorruptSampleError, match=why):
        dataset.__getitems__(last.tolist())
    with pytest.raises(CorruptSampleError, match=why):
        dataset[int(last[-1])]


def test_a_label_changed_in_the_index_is_refused_at_reopen(tmp_path):
    """An index whose label was changed (and its checksum in the manifest fixed up): reopening the
    store for training refuses it by sample, where it used to train on the wrong label."""
    source, planner, stores = staged(tmp_path / "store", world=2)
    store = stores[0]
    records = store.records.copy()
    records["label"][3] = (records["label"][3] + 1) % 10
    store.prepare(store.epoch, np.empty(0, dtype=np.int64), np.empty(0, dtype=records.dtype))
    store.commit()  # a valid new generation: only its label differs
    index = sorted(store.directory.glob("index-*.bin"))[-1]
    index.write_bytes(records.tobytes())
    manifest = json.loads((store.directory / "manifest.json").read_text())
    manifest["index_sha256"] = hashlib.sha256(index.read_bytes()).hexdigest()
    (store.directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=rf"1 sample\(s\) .* carry another label .*{int(records['id'][3])} "):
        stage(tmp_path / "store", 0, source, planner)


def test_verify_names_an_unsafe_path_and_checks_everything_else(tmp_path):
    """A pack replaced by a symlink out of the store: verify reports it as a problem (exit 1, not a
    crash with exit 2) and goes on to find a stray file in another rank's folder; --no-checksums
    on a clean store does not claim checksums it did not read."""
    _, _, stores = staged(tmp_path / "store", world=2)
    _outside_copy(tmp_path, next(stores[0].pack_dir.glob("pack-*.bin")))
    (stores[1].directory / "notes.txt").write_text("hello")
    verify = [sys.executable, "-m", "reshuffle", "verify", str(tmp_path / "store")]
    result = subprocess.run(verify, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "rank 0: " in result.stdout and "resolves outside" in result.stdout
    assert "rank 1: stray file notes.txt" in result.stdout
    _, _, _ = staged(tmp_path / "clean", world=2)
    result = subprocess.run([*verify[:-1], str(tmp_path / "clean"), "--no-checksums"], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0 and "checksums not read" in result.stdout


def test_verify_says_when_a_restart_cannot_repair_a_stale_manifest(tmp_path):
    """Ranks whose manifests are epochs apart with no exchange in flight: the advice is to
    restage, not the restart that cannot help (it was "restart the job to finish it")."""
    _, _, stores = staged(tmp_path / "store", world=2)
    empty = np.empty(0, dtype=np.int64)
    for _ in range(2):  # rank 0 moves on two epochs by itself (nothing moves)
        stores[0].prepare(stores[0].epoch + 1, empty, np.empty(0, dtype=stores[0].records.dtype))
        stores[0].commit()
    problems = verify_store(tmp_path / "store")
    stale = [p for p in problems if p.startswith("stale manifest")]
    assert stale and "a restart cannot repair it; restage the store" in stale[0], problems


class _Failure:
    """What torch's elastic agent reports per failed rank (ProcessFailure's fields we read)."""

    def __init__(self, timestamp, message="", exitcode=1, signal=""):
        self.timestamp, self.exitcode, self._signal = timestamp, exitcode, signal
        self.message = {"message": message}

    def signal_name(self):
        return self._signal or "<N/A>"


def test_the_job_error_names_the_rank_that_caused_the_others_to_fail():
    """The earliest failure is often a peer's "Connection closed by peer"; the cause is the rank
    whose error is its own (or a signal other than the agent's SIGTERM)."""
    failures = {
        0: _Failure(10, "RuntimeError: [../gloo/transport/tcp/pair.cc:534] Connection closed by peer"),
        1: _Failure(
            11, "StoreError: rank 1: stray file(s) notes.txt in /s/rank-00001 are not part of a store"
        ),
        2: _Failure(12, "PeerError: rank 2: recovery failed (...); a peer rank died or hung, or failed"),
    }
    rank, why, others, _ = root_failure(failures)
    assert (rank, others) == (1, 2) and why.startswith("StoreError: rank 1: stray file(s) notes.txt")
    killed = {0: _Failure(5, "DistBackendError: timed out"), 1: _Failure(6, exitcode=-9, signal="SIGKILL")}
    assert root_failure(killed)[:2] == (1, "killed by SIGKILL")
    stopped = {0: _Failure(5, exitcode=-15, signal="SIGTERM"), 1: _Failure(6, "ValueError: bad")}
    assert root_failure(stopped)[:2] == (1, "ValueError: bad")
    named = {0: _Failure(4, "PeerError: rank 0: 1 rank(s) could not ...; caused by rank 2: StoreError: bad")}
    assert root_failure(named)[:2] == (2, "StoreError: bad")
    only_peers = {3: _Failure(7, "RuntimeError: Connection reset by peer"), 2: _Failure(8, "PeerError: x")}
    assert root_failure(only_peers)[0] == 3  # no cause among them: the earliest
    silent = "rank 2 hung: no heartbeat for 61 s (pid 9 on h: stopped, deadlocked, or its node unreachable)"
    hung = {
        0: _Failure(5, f"PeerError: rank 0 failed because {silent}; rank 0 stopped rank(s) 2 (SIGKILL)"),
        1: _Failure(6, exitcode=-15, signal="SIGTERM"),
        2: _Failure(4, exitcode=-9, signal="SIGKILL"),
    }
    assert (
        root_failure(hung)[:4:3] == (2, 0)
        and root_failure(hung).why == "hung: " + silent[len("rank 2 hung: ") :]
    )
    # rank 0 stopped the hung rank 2; rank 1 then saw its connection break and was recorded first
    lost = "rank 2 lost: its connection broke and it has not beaten for 13 s (pid 9 on h: it died, ...)"
    hung[1] = _Failure(3, f"PeerError: rank 1 failed because {lost}")
    assert root_failure(hung)[:4:3] == (2, 0) and root_failure(hung).why.startswith("hung: ")
    del hung[0]  # nobody stopped it: it was lost
    assert root_failure(hung)[:4:3] == (2, 1) and root_failure(hung).why.startswith("lost: ")


@pytest.mark.slow
def test_a_ranks_own_error_is_the_jobs_error_and_its_traceback_is_in_its_log(tmp_path):
    """A stray file in rank 1's store folder (found when the job resumes): the job's one-line
    error is rank 1's own ("stray"), not rank 0's gloo error, and logs/rank-1.log holds the
    traceback the error line points at."""
    run = [sys.executable, "-m", "reshuffle", "run", str(CONFIGS / "smoke.yaml"), "--nproc", "2",
           f"log.dir={tmp_path}", "name=stray", "shuffle.mode=store", "data.synthetic.num_samples=400",
           "data.test_limit=64", "train.workers=0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([*run, "train.epochs=1"], capture_output=True, text=True, timeout=240, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    (tmp_path / "stray" / "store" / "rank-00001" / "notes.txt").write_text("hello")
    second = subprocess.run(
        [*run, "train.epochs=3", "--resume"], capture_output=True, text=True, timeout=240, env=env
    )
    assert second.returncode == 1
    line = [line for line in second.stderr.splitlines() if line.startswith("reshuffle: error:")][-1]
    assert line.startswith("reshuffle: error: rank 1 failed (StoreError: rank 1: stray file(s) notes.txt"), (
        line
    )
    assert "Traceback: " in line and line.endswith("rank-1.log")
    assert "Traceback (most recent call last)" not in second.stderr and "api.py" not in second.stderr, (
        second.stderr[-3000:]  # the agent's copy of every traceback stays out of the console
    )
    logged = (tmp_path / "stray" / "logs" / "rank-1.log").read_text()
    assert "Traceback (most recent call last)" in logged and "stray file(s) notes.txt" in logged


@pytest.mark.slow
@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (["data.name=nope"], "data.name: unknown dataset 'nope'"),
        (["--resume", "train.epochs=2"], "--resume: the checkpoint"),
    ],
)
def test_config_errors_are_one_line_before_any_rank_starts(tmp_path, settings, expected):
    """An unknown dataset, or a resume whose checkpoint was written with other settings: the same
    one line as any CLI error, before a rank is spawned (no rank log, no torch traceback)."""
    run = [sys.executable, "-m", "reshuffle", "run", str(CONFIGS / "smoke.yaml"), "--nproc", "2",
           f"log.dir={tmp_path}", "name=early", "data.synthetic.num_samples=200",
           "data.test_limit=32", "train.workers=0"]  # fmt: skip
    if "--resume" in settings:  # a finished 1-epoch run, whose config.yaml then disagrees on seed
        first = subprocess.run([*run, "train.epochs=1"], capture_output=True, text=True, timeout=240)
        assert first.returncode == 0, first.stderr[-2000:]
        (tmp_path / "early" / "config.yaml").write_text(
            (tmp_path / "early" / "config.yaml").read_text().replace("seed: 0", "seed: 5")
        )
        (tmp_path / "early" / "logs" / "rank-1.log").unlink()
    result = subprocess.run([*run, *settings], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"reshuffle: error: {expected}"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "early" / "logs" / "rank-1.log").exists()


def _stage_in_another_process(root):
    from reshuffle import ShufflePlanner
    from reshuffle.data.synthetic import load_synthetic

    source = load_synthetic("train", num_samples=100, sample_bytes=1000)  # as staged() does
    planner = ShufflePlanner(100, 3, strategy="partial", fraction=0.2, seed=1)
    try:
        stage(root, 0, source, planner)
    except StoreError as error:
        return str(error)
    return None


def test_a_second_job_on_a_store_in_use_is_refused_before_it_touches_anything(tmp_path):
    """This process stages (and so holds) the store; another process staging the same rank is
    refused by name, and the store is untouched (a prepared exchange would survive)."""
    import multiprocessing

    _, _, stores = staged(tmp_path / "store")
    before = sorted(p.name for p in stores[0].directory.rglob("*"))
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        message = pool.apply(_stage_in_another_process, (tmp_path / "store",))
    assert message is not None and "is in use by another job (pid " in message
    assert "give this one another shuffle.store_dir" in message
    assert sorted(p.name for p in stores[0].directory.rglob("*")) == before
    assert verify_store(tmp_path / "store") == []  # the lock file is part of a store


@pytest.mark.parametrize(
    ("code", "expected"),
    [(errno.ENOSPC, r"no space left on the disk holding .*Free space there, or set shuffle.store_dir"),
     (errno.EACCES, r"cannot write .*Make .* writable by this user")],
)  # fmt: skip
def test_a_full_or_unwritable_disk_names_the_path_and_the_fix_and_leaves_nothing(
    tmp_path, monkeypatch, code, expected
):
    """Staging that hits a full disk (or a permission error) says where and what to do, not a bare
    OSError or "a peer may have died", and leaves no partial pack behind."""
    from reshuffle import ShufflePlanner
    from reshuffle.data.synthetic import load_synthetic
    from reshuffle.store.packs import PackWriter

    real_append, calls = PackWriter.append, []

    def failing_append(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise OSError(code, os.strerror(code), str(self.directory / "pack-00000001.bin"))
        return real_append(self, *args, **kwargs)

    monkeypatch.setattr(PackWriter, "append", failing_append)
    source = load_synthetic("train", num_samples=60, sample_bytes=1000)
    with pytest.raises(StoreError, match=expected):
        stage(tmp_path / "store", 0, source, ShufflePlanner(60, 2, seed=1))
    assert not list((tmp_path / "store" / "rank-00000" / "packs").glob("pack-*.bin"))


def test_a_collective_failure_is_a_peer_error_and_ours_pass_unchanged(tmp_path):
    error = describe_failure(RuntimeError("Connection closed by peer"), 1, tmp_path, "the commit barrier")
    assert isinstance(error, PeerError) and "rank 1: the commit barrier failed" in str(error)
    own = StoreError("rank 1: stray file")
    assert describe_failure(own, 1, tmp_path, "x") is own


def _run(tmp_path, *arguments):
    command = [sys.executable, "-m", "reshuffle", "run", str(CONFIGS / "smoke.yaml"), f"log.dir={tmp_path}",
               *arguments]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


EXACT = [
    "--nproc", "3", "train.deterministic=true", "train.epochs=4", "data.synthetic.num_samples=1024",
    "data.test_limit=64", "shuffle.strategy=importance", "shuffle.fraction=0", "shuffle.warmup_epochs=2",
    "shuffle.interval_epochs=1", "train.workers=0", "log.every_steps=0",
]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted_three_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("whole")
    _run(root, *EXACT, "name=whole")
    return root / "whole"


def _final_weights(run_dir):
    return torch.load(Checkpoints(run_dir / "checkpoints", 1).latest(), weights_only=True)["model"]


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "stop"), [("index", 22), ("store", 26)])
def test_three_ranks_resume_exactly_at_an_epoch_boundary_and_mid_epoch(
    tmp_path, uninterrupted_three_ranks, mode, stop
):
    """Importance re-partitioning every epoch, 3 ranks (11 steps per epoch), stopped at the end
    of epoch 1 (22) or inside epoch 2 (26) and resumed: every rank trains the same orders with the
    same losses, and the final weights are equal to the bit. (DDP lays its gradient buckets out
    again after its first backward; with 3+ ranks the sums depend on that layout, so the first
    steps after a resume drifted by a few ulps, then the losses and the importance order.)"""
    _run(tmp_path, *EXACT, f"shuffle.mode={mode}", "name=parts", f"train.max_steps={stop}")
    _run(tmp_path, *EXACT, f"shuffle.mode={mode}", "name=parts", "--resume")
    for rank in range(3):
        whole = _rows(uninterrupted_three_ranks / "metrics" / f"rank-{rank}.csv")
        parts = _rows(tmp_path / "parts" / "metrics" / f"rank-{rank}.csv")
        assert [(r["order_sha"], r["train_loss"]) for r in parts] == [
            (r["order_sha"], r["train_loss"]) for r in whole
        ]
    whole, parts = _final_weights(uninterrupted_three_ranks), _final_weights(tmp_path / "parts")
    assert all(torch.equal(whole[key], parts[key]) for key in whole)


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_a_stopped_rank_is_named_and_the_job_ends_within_the_timeout(tmp_path):
    """SIGSTOP rank 1 of 3 while store-mode training runs (exchange in flight): the job's error names
    rank 1 as hung (no heartbeat), not the healthy rank whose collective timed out, and the job
    ends within dist.timeout_s plus a few seconds (the stopped process is killed, not awaited for
    the launcher's 30 s SIGTERM grace). Nothing is lost: the job resumes and the store verifies."""
    run = [sys.executable, "-m", "reshuffle", "run", str(CONFIGS / "smoke.yaml"), "--nproc", "3",
           f"log.dir={tmp_path}", "name=hang", "shuffle.mode=store", "shuffle.fraction=0.5",
           "data.synthetic.num_samples=600", "data.test_limit=64", "dist.timeout_s=12"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([*run, "train.epochs=500"], stderr=subprocess.PIPE, text=True, env=env)
    logs = tmp_path / "hang" / "logs"
    try:
        deadline = time.monotonic() + 120
        while "epoch 1:" not in _read(logs / "rank-0.log"):
            assert time.monotonic() < deadline and job.poll() is None, "training did not start"
            time.sleep(0.2)
        pid = int(re.search(r"rank 1: pid (\d+)", _read(logs / "rank-1.log")).group(1))
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        _, stderr = job.communicate(timeout=120)
        elapsed = time.monotonic() - stopped
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 1
    line = [line for line in stderr.splitlines() if line.startswith("reshuffle: error:")][-1]
    assert line.startswith("reshuffle: error: rank 1 hung: no heartbeat for "), line
    assert f"pid {pid}" in line and "Details: " in line
    assert elapsed < 12 + 8, f"the job took {elapsed:.1f} s to end after rank 1 stopped"
    assert not Path(f"/proc/{pid}").exists() or "zombie" in _read(Path(f"/proc/{pid}/status"))
    resumed = subprocess.run([*run, "train.epochs=4", "--resume"], capture_output=True, text=True,
                             timeout=240, env=env)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert verify_store(tmp_path / "hang" / "store") == []


def _read(path):
    try:
        return Path(path).read_text()
    except OSError:
        return ""


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_store_dir_that_cannot_be_a_directory_is_a_named_error(tmp_path, where):
    """store_dir is a file, or lies under one: a StoreError naming the path and the fix (it was a
    raw FileExistsError / NotADirectoryError)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    store_dir = blocker if where == "a file" else blocker / "store"
    source = load_synthetic("train", num_samples=20)
    with pytest.raises(
        StoreError, match=rf"cannot use {store_dir} as a store directory .* shuffle.store_dir"
    ):
        stage(store_dir, 0, source, ShufflePlanner(20, 1))
    assert blocker.read_text() == "not a directory"


def _open_with_a_stray_file(rank, world, root):
    source = load_synthetic("train", num_samples=100, sample_bytes=1000)
    planner = ShufflePlanner(100, world, strategy="partial", fraction=0.2, seed=1)
    started = time.monotonic()
    try:
        open_or_stage(root, rank, source, planner, 0)
    except (StoreError, PeerError) as error:
        return type(error).__name__, str(error), time.monotonic() - started
    return "opened", "", time.monotonic() - started


def test_a_rank_that_cannot_open_its_store_fails_every_rank_at_once(tmp_path):
    """Rank 1's store holds a stray file at resume: rank 1 raises its own error and rank 0 a
    PeerError naming rank 1 at once, not after the process group's timeout (60 s here) in the
    next collective (on several nodes nothing else would stop rank 0 sooner)."""
    assert [o[0] for o in run_ranks(_open_with_a_stray_file, 2, tmp_path / "store", timeout=50)] == [
        "opened"
    ] * 2
    (tmp_path / "store" / "rank-00001" / "notes.txt").write_text("hello")
    outcomes = run_ranks(_open_with_a_stray_file, 2, tmp_path / "store", timeout=50)
    assert outcomes[1][0] == "StoreError" and "stray file(s) notes.txt" in outcomes[1][1]
    assert (
        outcomes[0][0] == "PeerError" and "caused by rank 1: StoreError: rank 1: stray file" in outcomes[0][1]
    )
    assert outcomes[0][2] < 20


class Blobs(torch.utils.data.Dataset):
    """A user's dataset of encoded images: (bytes of 20-30 KB, label) items (the ImageNet case)."""

    def __init__(self, num: int = 24) -> None:
        self.targets = [i % 3 for i in range(num)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = np.random.default_rng(index).integers(0, 256, 20_000 + 397 * index, dtype=np.uint8)
        return image.tobytes(), self.targets[index]


def _blob_store(root):
    from reshuffle.data.items import DatasetSource
    from reshuffle.store.dataset import StoreItems

    source = DatasetSource(Blobs())
    store = stage(root, 0, source, ShufflePlanner(len(source), 1, strategy="local", seed=0))[0]
    return store, StoreItems(store, source.decoder)


def test_a_large_bytes_item_is_read_in_two_parts_and_both_are_checked(tmp_path, monkeypatch):
    """An item's large bytes value is read straight into the bytes it returns (head and body
    apart, reshuffle.data.items): the items are the dataset's, and a byte flipped in the head or
    in the body, or a pack cut inside a body, is a CorruptSampleError naming the sample. Records
    written whole (before RSI2) read as they were."""
    from reshuffle.data import items

    store, dataset = _blob_store(tmp_path / "store")
    ids = store.ids.tolist()
    assert dataset.__getitems__(ids) == [Blobs()[i] for i in ids]
    assert all(isinstance(r, tuple) for r in store.read_many(store.ids, items.head_size))  # split
    for position, at in ((3, 6), (5, 13), (9, None)):  # the head's size, its value; the body
        bad = _flip(store, position, at)
        with pytest.raises(CorruptSampleError, match=rf"sample {bad} in this rank's own store is damaged"):
            dataset.__getitems__([bad])
    last = store.records[-1]
    pack = store.pack_dir / pack_name(int(last["pack"]))
    with open(pack, "r+b") as handle:
        handle.truncate(int(last["offset"]) + int(last["length"]) - 100)
    with pytest.raises(CorruptSampleError, match=rf"sample {int(last['id'])} .*its pack is truncated"):
        list(store.read_many(np.array([last["id"]]), items.head_size))  # the pack shrank since it opened

    monkeypatch.setattr(items, "BODY_FROM", 1 << 30)  # records as a store before RSI2 wrote them
    store, dataset = _blob_store(tmp_path / "old")
    assert not any(isinstance(r, tuple) for r in store.read_many(store.ids, items.head_size))
    assert dataset.__getitems__(store.ids.tolist()) == [Blobs()[i] for i in store.ids.tolist()]


def test_a_batch_announces_its_reads_when_the_kernel_says_they_will_go_to_the_disk(tmp_path, monkeypatch):
    """POSIX_FADV_WILLNEED for every read of a batch pays when the reads go to the disk and costs
    a system call per sample when they do not. The kernel is asked (a one-byte RWF_NOWAIT read)
    for the batch's first record and after a slow read: a cached batch is never announced however
    slow its reads (a preempted worker), an uncached one is, from the record found uncached. The
    kernel keeps pages: the one asked about is the record's own (its middle), never the page it
    shares with a cached neighbour, which would call an uncached record cached (measured under
    memory pressure: 40% of a random epoch's batches then read 1-13 records one by one
    from the disk before announcing the rest)."""
    import errno

    from reshuffle.store import reads

    page = 4096
    store, _ = _blob_store(tmp_path / "store")
    reader = store.reader
    announced: list[int] = []
    real = reader._announce
    monkeypatch.setattr(reader, "_announce", lambda where: (announced.append(where.size), real(where)))
    asked: list[int] = []
    cached: set[int] = set()  # the pages in the page cache

    def preadv(descriptor, buffers, offset, flags=0):
        assert flags == os.RWF_NOWAIT
        asked.append(offset)
        if offset // page not in cached:
            raise BlockingIOError(errno.EAGAIN, "would block")
        return 1

    def cache(records: range) -> None:
        cached.clear()
        for start, length in [spans[r] for r in records]:
            cached.update(range(start // page, (start + length - 1) // page + 1))

    monkeypatch.setattr(reads.os, "preadv", preadv)
    monkeypatch.setattr(reader, "_can_ask", True)
    batch = store.ids[:10]
    where = store.position(batch)
    spans = list(zip(reader.offsets[where].tolist(), reader.lengths[where].tolist(), strict=True))
    assert all(spans[r][0] % page for r in range(1, 10))  # each shares a page with the one before
    cache(range(10))
    monkeypatch.setattr(reads, "FROM_CACHE_WITHIN", -1.0)  # every read is slow (preempted)
    list(store.read_many(batch))
    assert announced == [] and len(asked) == 10  # the first record, then after each slow read
    cache(range(4))  # the rest of the batch is not in the page cache; the fifth record's first
    asked.clear()  # page is, as the fourth's last
    list(store.read_many(batch))
    assert announced == [6] and len(asked) == 5  # found at the fifth record: not asked again
    cache(range(0))
    monkeypatch.setattr(reads, "FROM_CACHE_WITHIN", 3600.0)  # fast reads: asked once, announced
    list(store.read_many(batch))
    assert announced == [6, 10]


def test_a_batch_that_goes_to_the_disk_announces_the_next_batches_of_the_order(tmp_path, monkeypatch):
    """The plan knows the whole epoch: a batch whose reads go to the disk announces, with its own,
    the reads of the next AHEAD_BATCHES batches of the order the dataset follows, so that the
    disk's queue does not run dry between one batch and the next. The last batches announce what
    is left; a batch that is not where the order says (a user's own sampler, an order from an
    epoch before) announces only its own; a cached batch nothing, and does not look the next
    batches up (it costs a batch of small cached samples a fifth of its time); without an order,
    its own."""
    import errno

    from reshuffle.store import dataset as store_dataset
    from reshuffle.store import reads

    store, items = _blob_store(tmp_path / "store")
    reader = store.reader
    announced: list[list[int]] = []
    real = reader._announce
    monkeypatch.setattr(
        reader, "_announce", lambda where: (announced.append(reader.ids[where].tolist()), real(where))
    )
    monkeypatch.setattr(store_dataset, "AHEAD_BATCHES", 2)
    cached = False
    real_preadv = os.preadv

    def preadv(descriptor, buffers, offset, flags=0):
        if flags == os.RWF_NOWAIT and not cached:
            raise BlockingIOError(errno.EAGAIN, "would block")
        return real_preadv(descriptor, buffers, offset, flags)

    monkeypatch.setattr(reads.os, "preadv", preadv)
    monkeypatch.setattr(reader, "_can_ask", True)
    order = np.random.default_rng(0).permutation(store.ids)
    batches = [order[i : i + 4].tolist() for i in range(0, order.size, 4)]
    items.follow(order)

    def read(batch: list[int]) -> list[list[int]]:
        announced.clear()
        assert items.__getitems__(batch) == [Blobs()[i] for i in batch]
        return list(announced)

    assert read(batches[0]) == [batches[0], batches[1] + batches[2]]
    assert read(batches[-2]) == [batches[-2], batches[-1]]
    assert read(batches[-1]) == [batches[-1]]
    shuffled = [batches[1][1], batches[1][0], *batches[1][2:]]
    assert read(shuffled) == [shuffled]
    items.follow(np.random.default_rng(1).permutation(store.ids))  # the epoch after: another order
    assert read(batches[0]) == [batches[0]]
    items.follow(None)
    assert read(batches[0]) == [batches[0]]
    items.follow(order)
    cached = True
    asked: list[int] = []
    real_ahead = items._ahead
    monkeypatch.setattr(items, "_ahead", lambda ids: (asked.append(ids.size), real_ahead(ids))[1])
    assert read(batches[0]) == [] and asked == []  # the next batches not even looked up
    cached = False
    assert read(batches[0]) == [batches[0], batches[1] + batches[2]] and asked == [4]


class _Order(torch.utils.data.Sampler):
    """The ids it is given, in that order (a loop's own sampler)."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    def __iter__(self):
        return iter(self.ids)

    def __len__(self):
        return len(self.ids)


class _AheadItems(StoreItems):
    """StoreItems whose batch is what it would announce after itself."""

    def __getitems__(self, ids):
        return [self._ahead(np.asarray(ids))]


def _first(batch):
    return batch[0]


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_persistent_workers_follow_each_epochs_order(tmp_path, context):
    """DataLoader workers that outlive an epoch (persistent_workers) hold the dataset as it was
    when they started; the order they look ahead in is each epoch's all the same (shared memory),
    forked or spawned. An order too long for the shared buffer gets a new one: the workers holding
    the old one look ahead in none rather than in a stale one."""
    store, plain = _blob_store(tmp_path / "store")
    items = _AheadItems(store, plain.decode)
    sampler = _Order()
    loader = torch.utils.data.DataLoader(
        items, batch_size=4, sampler=sampler, num_workers=1, persistent_workers=True,
        collate_fn=_first, multiprocessing_context=context,
    )  # fmt: skip
    for seed in (0, 1, 2):
        order = np.random.default_rng(seed).permutation(store.ids)
        items.follow(order)
        sampler.ids = order.tolist()
        ahead = [None if a is None else a.tolist() for a in loader]
        assert ahead[0] == order[4:16].tolist() and ahead[-1] == [], seed
    longer = np.concatenate([order, order + 1000])
    items.follow(longer)
    sampler.ids = order.tolist()
    assert all(a is None for a in loader)  # the worker's buffer was given up
    assert items._ahead(order[:4]).tolist() == order[4:16].tolist()  # this process: the new one


def test_where_the_kernel_cannot_tell_the_time_reads_take_decides(tmp_path, monkeypatch):
    """Without RWF_NOWAIT (an old kernel, a file system without it: the first ask fails), a batch
    after one read from the page cache is not announced; in such a batch the second slow read
    announces the rest, and the next batch whole."""
    import errno

    from reshuffle.store import reads

    store, _ = _blob_store(tmp_path / "store")
    reader = store.reader
    announced: list[int] = []
    real = reader._announce
    monkeypatch.setattr(reader, "_announce", lambda where: (announced.append(where.size), real(where)))

    def unsupported(*args):
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(reads.os, "preadv", unsupported)
    batch = store.ids[:10]
    monkeypatch.setattr(reads, "FROM_CACHE_WITHIN", 3600.0)  # every read is fast
    for _ in range(3):
        list(store.read_many(batch))
    assert announced == [10] and not reader._can_ask  # the first batch (nothing known yet), then none
    monkeypatch.setattr(reads, "FROM_CACHE_WITHIN", -1.0)  # every read is slow: the disk's
    list(store.read_many(batch))
    assert announced == [10, 8]  # the rest of the batch after its second slow read
    list(store.read_many(batch))
    assert announced == [10, 8, 10]


def test_the_kernel_says_a_just_written_pack_is_in_the_page_cache(tmp_path):
    """The real question, asked of this machine's kernel and file system: a pack just written
    is in the page cache (or the kernel cannot tell, and the reader falls back to timing)."""
    store, _ = _blob_store(tmp_path / "store")
    reader = store.reader
    descriptor, _ = reader._file(int(reader.packs[0]), int(reader.ids[0]))
    start, length = int(reader.offsets[0]), int(reader.lengths[0])
    assert reader._in_page_cache(descriptor, start, length) in (True, None)
    assert reader._can_ask == (reader._in_page_cache(descriptor, start, length) is True)


def test_a_stopped_heartbeat_has_no_thread_left_in_a_store_call():
    """Heartbeat.stop waits for its thread: a daemon thread still inside a store call when the
    interpreter exits is ended mid-call and aborts the process ("terminate called without an
    active exception", once in a user's loop example at exit)."""
    from reshuffle.heartbeat import Heartbeat

    class SlowStore:  # a beat that takes a while, as over a busy network
        def set(self, key, value):
            time.sleep(0.3)

    heartbeat = Heartbeat(0, 2, SlowStore()).start()  # type: ignore[arg-type]
    time.sleep(1.1)  # inside the second beat
    heartbeat.stop()
    assert heartbeat._thread is not None and not heartbeat._thread.is_alive()
