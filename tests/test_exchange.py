"""Store mode across real processes (gloo, spawned ranks, hard timeouts)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from reshuffle import ShufflePlanner
from reshuffle.data import SourceDataset
from reshuffle.data.synthetic import load_synthetic
from reshuffle.data.transforms import build_transform
from reshuffle.plan.checks import feed_losses
from reshuffle.store import (
    ExchangeError,
    Exchanger,
    RankStore,
    StoreDataset,
    new_exchange_group,
    stage,
    store_meta,
    synchronize,
    verify_store,
)
from reshuffle.store.space import reserve
from spawn import launch, run_ranks

pytestmark = pytest.mark.slow

SAMPLE_BYTES = 3000  # pixels (784) plus padding: exchanges move real weight
CHUNK = 40_000  # small rounds, so every exchange takes several


def _source(num: int):
    return load_synthetic("train", num_samples=num, shape=(1, 28, 28), sample_bytes=SAMPLE_BYTES)


def _planner(num: int, world: int, strategy: str, fraction: float) -> ShufflePlanner:
    options = {
        "importance": {"warmup_epochs": 1, "interval_epochs": 1},  # re-partition every epoch
        "partial-importance": {"select": "importance"},
    }.get(strategy, {})
    strategy = strategy.split("-")[0]
    return ShufflePlanner(
        num, world, strategy=strategy, fraction=fraction, partition="random", seed=3, **options
    )


def _conserve(rank, world, root, num, strategy, fraction, epochs):
    source = _source(num)
    planner = _planner(num, world, strategy, fraction)
    store, _ = stage(root, rank, source, planner)
    exchanger = Exchanger(store, planner, group=new_exchange_group(60), chunk_bytes=CHUNK)
    rows = []
    for epoch in range(epochs):
        if planner.strategy.uses_losses:  # the trainer's reduced losses, stood in for
            feed_losses(planner, epoch)
        stats = exchanger.exchange(epoch)
        holds_plan = np.array_equal(store.ids, planner.plan(epoch + 1).holdings(rank))
        bytes_intact = all(store.read(int(i)) == source.raw(int(i)) for i in store.ids)
        exchanger.settle()  # the upkeep after the commit: dead space freed, the next landing reserved
        reserve = store.pack_dir / "reserve.bin"
        reserved = reserve.stat().st_size if reserve.exists() else 0
        rows.append(
            (stats.samples_sent, stats.bytes_sent, stats.samples_received, stats.bytes_received,
             stats.wire_bytes_sent, stats.rounds, exchanger.peer_chunk, holds_plan, bytes_intact,
             reserved)
        )  # fmt: skip
    return rows


@pytest.mark.parametrize(
    ("world", "num", "strategy", "fraction"),
    [
        (2, 501, "partial", 0.1),
        (3, 301, "partial", 0.5),
        (4, 303, "partial", 1.0),
        (3, 200, "global", 0.0),
        (3, 301, "partial-importance", 0.3),
        (3, 302, "importance", 0.0),
    ],
)
def test_exchanges_conserve_the_dataset_and_move_exactly_k_samples(tmp_path, world, num, strategy, fraction):
    epochs = 3
    results = run_ranks(_conserve, world, str(tmp_path), num, strategy, fraction, epochs, timeout=180)
    k = round(fraction * (num // world))
    can_reserve = reserve(tmp_path / "probe", 4096)  # fallocate works here
    (tmp_path / "probe").unlink(missing_ok=True)
    for rank, rows in enumerate(results):
        for epoch, row in enumerate(rows):
            sent, sent_bytes, received, received_bytes, wire, rounds, peer_chunk, holds_plan, intact = row[:9]
            reserved = row[9]
            assert holds_plan and intact, (rank, epoch)
            assert reserved == (received_bytes if can_reserve else 0)  # the next exchange's landing
            if strategy.startswith("partial"):
                assert sent == received == k
                assert sent_bytes == received_bytes == k * SAMPLE_BYTES
            assert rounds >= -(-wire // peer_chunk) // max(1, world - 1)  # bounded chunks per peer
            assert rounds <= -(-wire // peer_chunk)
    assert verify_store(tmp_path) == []


def _orders_match(rank, world, root, num):
    source = _source(num)
    planner = _planner(num, world, "partial", 0.3)
    store, _ = stage(root, rank, source, planner)
    exchanger = Exchanger(store, planner, group=new_exchange_group(60), chunk_bytes=CHUNK)
    transform = build_transform(["normalize"], [0.5], [0.25])
    index_mode = SourceDataset(source, transform)
    store_mode = StoreDataset(store, source.decoder, transform)
    matches = []
    for epoch in range(3):
        order = planner.plan(epoch).indices(rank).tolist()
        workers = 2 if epoch == 1 else 0  # spawned workers once (each costs a torch import)
        batches = [
            list(DataLoader(dataset, batch_size=16, sampler=order, num_workers=w))
            for dataset, w in ((index_mode, 0), (store_mode, workers))
        ]
        same = all(
            all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) for a, b in zip(*batches, strict=True)
        )
        seen = torch.cat([batch[2] for batch in batches[1]]).tolist()
        matches.append(same and seen == order)
        exchanger.exchange(epoch)
    return matches


def test_index_and_store_mode_feed_a_rank_the_same_samples_in_the_same_order(tmp_path):
    results = run_ranks(_orders_match, 2, str(tmp_path), 203, timeout=180)
    assert all(all(per_epoch) for per_epoch in results)


# ----------------------------------------------------------------------------- faults

VICTIM = 1
CRASH_EPOCH = 1
PG_TIMEOUT_S = 20
HANG_TIMEOUT_S = 6


def _checkpoint(root: str, epoch: int) -> None:
    """What a trainer's checkpoint contributes to recovery: the epoch the job resumes at."""
    path = Path(root).parent / "checkpoint.json"
    path.with_suffix(".tmp").write_text(json.dumps({"epoch": epoch}))
    os.replace(path.with_suffix(".tmp"), path)


def _resume_epoch(root: str) -> int:
    path = Path(root).parent / "checkpoint.json"
    return json.loads(path.read_text())["epoch"] if path.exists() else 0


def _crash(rank, world, root, num, phase, action, timeout_s=PG_TIMEOUT_S):
    source = _source(num)
    planner = _planner(num, world, "partial", 0.5)
    store, _ = stage(root, rank, source, planner)
    current = {"epoch": -1}

    def on_phase(name):
        if rank == VICTIM and name == phase and current["epoch"] == CRASH_EPOCH:
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(timeout_s + 10)  # hang past the others' timeout, then vanish
            os._exit(3)

    exchanger = Exchanger(
        store, planner, group=new_exchange_group(timeout_s), chunk_bytes=CHUNK, on_phase=on_phase
    )
    for epoch in range(3):
        current["epoch"] = epoch
        started = time.monotonic()
        try:
            exchanger.exchange(epoch, before_commit=lambda e=epoch: rank == 0 and _checkpoint(root, e + 1))
        except ExchangeError as error:
            return {"error": str(error), "seconds": time.monotonic() - started, "epoch": epoch}
    return {"error": None}


def _restart(rank, world, root, num, target):
    source = _source(num)
    planner = _planner(num, world, "partial", 0.5)
    store = RankStore.open(root, rank, store_meta(source, planner))
    exchanger = Exchanger(store, planner, group=new_exchange_group(60), chunk_bytes=CHUNK)
    actions = synchronize(exchanger, target)
    held = [np.array_equal(store.ids, planner.plan(target).holdings(rank))]
    for epoch in range(target, target + 2):
        exchanger.exchange(epoch)
        held.append(np.array_equal(store.ids, planner.plan(epoch + 1).holdings(rank)))
    intact = all(store.read(int(i)) == source.raw(int(i)) for i in store.ids)
    return actions, held, intact


@pytest.mark.parametrize("phase", ["counts", "payload", "prepared", "commit"])
def test_a_rank_killed_at_any_phase_loses_and_duplicates_nothing_after_a_restart(tmp_path, phase):
    root, world, num = str(tmp_path / "store"), 3, 241
    outcomes = launch(_crash, world, root, num, phase, "kill", timeout=150, pg_timeout_s=PG_TIMEOUT_S)
    assert outcomes[VICTIM].exitcode == -signal.SIGKILL
    for outcome in outcomes:
        if outcome.rank != VICTIM:
            assert outcome.ok, outcome.error
            report = outcome.value
            assert report["error"] is not None and "died or hung" in report["error"]
            assert report["seconds"] < PG_TIMEOUT_S + 10
    target = _resume_epoch(root)
    assert target == (CRASH_EPOCH + 1 if phase == "commit" else CRASH_EPOCH)
    if phase in ("prepared", "commit"):
        assert verify_store(root) != []  # the interrupted commit is visible offline
    results = run_ranks(_restart, world, root, num, target, timeout=150)
    for _, held, intact in results:
        assert all(held) and intact
    if phase == "commit":
        assert any("rolled an interrupted commit forward" in line for line in results[VICTIM][0])
    assert verify_store(root) == []


def test_a_hung_rank_ends_the_others_with_a_clear_error_within_the_timeout(tmp_path):
    root = str(tmp_path / "store")
    outcomes = launch(_crash, 3, root, 241, "payload", "hang", HANG_TIMEOUT_S, timeout=120, pg_timeout_s=60)
    assert outcomes[VICTIM].exitcode == 3  # it really hung until after the others gave up
    for outcome in outcomes:
        if outcome.rank != VICTIM:
            assert outcome.ok, outcome.error
            assert "died or hung" in outcome.value["error"]
            assert outcome.value["seconds"] < HANG_TIMEOUT_S + 10


def test_arrivals_are_checked_and_written_whatever_the_chunking(tmp_path):
    """The receiving side of a stream, without processes: fed in chunks that cut headers and
    payloads anywhere, it lands exactly the samples sent; a flipped byte, a stream cut short or
    headers naming other ids are named errors."""
    from reshuffle.store.wire import IncomingStream, OutgoingStream

    num = 64
    source = _source(num)
    store, _ = stage(tmp_path / "store", 0, source, ShufflePlanner(num, 1, strategy="local"))
    ids = np.sort(np.random.default_rng(1).choice(store.ids, 40, replace=False))
    wire = bytearray(OutgoingStream(store, ids).size)
    OutgoingStream(store, ids).take(len(wire), memoryview(wire))

    def receive(data: bytes, expected=ids, chunk=7919, size=None) -> np.ndarray:
        writer = store.pack_writer()
        size = len(data) if size is None else size
        sink = IncomingStream(0, expected, size, source.num_classes, writer)
        try:
            for start in range(0, len(data), chunk):
                sink.feed(memoryview(data)[start : start + chunk])
            sink.finish()
            return writer.close()
        finally:
            writer.abort()

    records = receive(bytes(wire))
    assert np.array_equal(np.sort(records["id"]), ids)
    for chunk in (1000, 3001, len(wire)):
        assert np.array_equal(receive(bytes(wire), chunk=chunk)["id"], records["id"])
    corrupt = bytearray(wire)
    corrupt[-5] ^= 0xFF  # inside the last payload
    with pytest.raises(ExchangeError, match="arrived corrupt"):
        receive(bytes(corrupt))
    with pytest.raises(ExchangeError, match=r"ended early \(\d+ of \d+ bytes\)"):
        receive(bytes(wire[:-100]), size=len(wire))  # the peer announced more than came
    with pytest.raises(ExchangeError, match="do not add up to the announced"):
        receive(bytes(wire[:-100]))  # headers and announced size disagree
    with pytest.raises(ExchangeError, match="ids the plan does not send"):
        receive(bytes(wire), expected=ids + 1)


def test_rounds_fill_the_pipeline_but_never_exceed_the_chunk():
    """Enough rounds for packing, transfer and landing to overlap (8 where each still moves
    1 MiB per peer), never more bytes per round than the chunk allows, none for nothing."""
    from reshuffle.store.transfer import MIN_ROUND_BYTES, PIPELINE_ROUNDS, rounds_for

    assert rounds_for(0, 32 << 20) == 0
    assert rounds_for(100, 32 << 20) == 1  # a small stream: one round
    assert rounds_for(3 * MIN_ROUND_BYTES, 32 << 20) == 3
    assert rounds_for(64 << 20, 32 << 20) == PIPELINE_ROUNDS  # was 2: nothing overlapped
    assert rounds_for(1 << 30, 32 << 20) == 32  # memory bound: 32 MiB per peer per round
