from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reshuffle import PARTITIONS, STRATEGIES, ShufflePlanner
from reshuffle.plan.checks import check_planner, feed_losses
from reshuffle.plan.strategies.partial import moves_per_epoch


@st.composite
def planners(draw, strategies=tuple(STRATEGIES), nodes=False):
    world = draw(st.integers(1, 64))
    num = draw(st.integers(world, 5000))
    strategy = draw(st.sampled_from(strategies))
    fraction = draw(st.floats(0, 1)) if strategy == "partial" else 0.0
    options = {}
    if strategy == "partial":
        options["select"] = draw(st.sampled_from(["random", "importance"]))
        if options["select"] == "random" and draw(st.booleans()):
            options.update(unit="block", block_size=draw(st.integers(1, 32)))
    if strategy == "importance":
        options = {
            "warmup_epochs": draw(st.integers(1, 2)),
            "interval_epochs": draw(st.integers(0, 2)),
            "assignment": draw(st.sampled_from(["stripes", "blocks"])),
        }
    if strategy == "corgipile":
        options = {"block_size": draw(st.integers(1, 64)), "buffer_blocks": draw(st.integers(1, 4))}
    partition = draw(st.sampled_from(sorted(PARTITIONS)))
    num_classes = draw(st.integers(1, 20))
    labels = np.random.default_rng(num).integers(0, num_classes, size=num)
    if nodes and strategy != "corgipile":  # node-aware: R ranks per node, R a divisor of the world
        options["ranks_per_node"] = draw(st.sampled_from([r for r in range(1, world + 1) if world % r == 0]))
    return ShufflePlanner(
        num,
        world,
        strategy=strategy,
        fraction=fraction,
        partition=partition,
        labels=labels,
        seed=draw(st.integers(0, 2**32)),
        drop_last=draw(st.booleans()),
        **options,
    )


@given(planners())
def test_every_plan_keeps_the_guarantees(planner):
    assert check_planner(planner, epochs=3) == []


@given(planners(nodes=True))
def test_every_node_aware_plan_keeps_the_guarantees(planner):
    assert check_planner(planner, epochs=3) == []


@given(planners(nodes=True))
def test_locate_inverts_the_slots(planner):
    strategy = planner.strategy
    if strategy.uses_losses:
        feed_losses(planner, 0)
    for epoch in (0, 1):
        for rank in range(planner.world_size):
            held = strategy.slots(epoch, rank)
            ranks, slots = strategy.locate(epoch, held)
            assert (ranks == rank).all() and np.array_equal(slots, np.arange(held.size))


@given(planners())
def test_length_is_ceil_or_floor_of_n_over_m(planner):
    n, m = planner.num_samples, planner.world_size
    plan = planner.plan(1)
    expected = n // m if planner.drop_last else math.ceil(n / m)
    assert plan.samples_per_rank == expected
    assert plan.num_dropped == (n % m if planner.drop_last else 0)
    assert plan.num_padded == (0 if planner.drop_last else (-n) % m)


@given(planners(strategies=("local",)))
def test_local_holdings_never_change(planner):
    first = [planner.plan(0).holdings(r) for r in range(planner.world_size)]
    for epoch in (1, 5):
        assert all(
            np.array_equal(first[r], planner.plan(epoch).holdings(r)) for r in range(planner.world_size)
        )
        assert all(planner.plan(epoch).sends(r) == {} for r in range(planner.world_size))


@given(planners(strategies=("partial",)))
def test_partial_moves_exactly_k_in_and_out_of_every_rank(planner):
    k = round(planner.fraction * (planner.num_samples // planner.world_size))
    if planner.world_size == 1:
        k = 0
    assert moves_per_epoch(planner.layout, planner.fraction) == k
    if planner.strategy.unit == "block":  # k in whole blocks of block_size
        k = planner.strategy.k
        assert k % planner.strategy.block == 0
    for epoch in range(4):
        if planner.strategy.uses_losses:  # select="importance": weighted by (stand-in) losses
            feed_losses(planner, epoch)
        plan, following = planner.plan(epoch), planner.plan(epoch + 1)
        for rank in range(planner.world_size):
            out = sum(ids.size for ids in plan.sends(rank).values())
            into = sum(ids.size for ids in plan.receives(rank).values())
            new = np.setdiff1d(following.holdings(rank), plan.holdings(rank)).size
            assert out == into == new == k


@given(st.integers(1, 32), st.integers(0, 3000), st.sampled_from(sorted(PARTITIONS)), st.booleans())
def test_partial_with_zero_fraction_is_local(world, extra, partition, drop_last):
    num = world + extra
    labels = np.arange(num) % 7
    kwargs = dict(partition=partition, labels=labels, seed=11, drop_last=drop_last)
    partial = ShufflePlanner(num, world, strategy="partial", fraction=0.0, **kwargs)
    local = ShufflePlanner(num, world, strategy="local", **kwargs)
    for epoch in (0, 1, 4):
        for rank in range(world):
            assert np.array_equal(partial.plan(epoch).indices(rank), local.plan(epoch).indices(rank))


def test_partial_sends_are_a_full_shuffle_of_the_rank():
    # Over many epochs, every slot of a rank leaves about equally often: the k that leave are
    # drawn from all of the rank's samples, not from a fixed prefix.
    planner = ShufflePlanner(4000, 4, strategy="partial", fraction=0.1, partition="contiguous", seed=2)
    leave_count = np.zeros(planner.num_samples)
    for epoch in range(200):
        for ids in planner.plan(epoch).sends(0).values():
            leave_count[ids] += 1
    held_ever = leave_count > 0
    assert held_ever.sum() > 0.9 * planner.num_samples  # samples circulate through rank 0
    destinations = np.zeros(4)
    for epoch in range(200):
        for dst, ids in planner.plan(epoch).sends(0).items():
            destinations[dst] += ids.size
    assert destinations[0] == 0
    assert np.all(np.abs(destinations[1:] / destinations[1:].mean() - 1) < 0.05)


def test_global_gives_a_fresh_random_partition_each_epoch():
    planner = ShufflePlanner(10_000, 8, strategy="global", seed=4)
    previous = planner.plan(0).holdings(3)
    for epoch in range(1, 6):
        current = planner.plan(epoch).holdings(3)
        overlap = np.intersect1d(previous, current).size / current.size
        assert abs(overlap - 1 / 8) < 0.03  # a random 1/8 of the dataset shares 1/8 with any other
        previous = current


def test_same_arguments_same_plans_in_any_order_of_calls():
    kwargs = dict(strategy="partial", fraction=0.3, partition="random", seed=9)
    forward = ShufflePlanner(777, 5, **kwargs)
    backward = ShufflePlanner(777, 5, **kwargs)
    ahead = [forward.plan(e).indices(r) for e in range(6) for r in range(5)]
    behind = [backward.plan(e).indices(r) for e in reversed(range(6)) for r in reversed(range(5))]
    behind = behind[::-1]
    assert all(np.array_equal(a, b) for a, b in zip(ahead, behind, strict=True))
    for epoch in (5, 2, 0):  # asking again, out of order, changes nothing
        for rank in range(5):
            assert np.array_equal(forward.plan(epoch).indices(rank), ahead[epoch * 5 + rank])


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_a_different_seed_gives_different_plans(strategy):
    kwargs = dict(strategy=strategy, fraction=0.2 if strategy == "partial" else 0.0)
    planners = [ShufflePlanner(500, 4, seed=seed, **kwargs) for seed in (1, 2)]
    for planner in planners:
        for epoch in range(2 if planner.strategy.uses_losses else 0):
            feed_losses(planner, epoch)
    a, b = (planner.plan(2) for planner in planners)
    assert not np.array_equal(a.indices(0), b.indices(0))


FRESH_PROCESS = """
import hashlib, json, sys
import numpy as np
from reshuffle import ShufflePlanner
args = json.loads(sys.argv[1])
planner = ShufflePlanner(args["n"], args["m"], strategy=args["strategy"], fraction=args["q"],
                         partition=args["partition"], labels=np.arange(args["n"]) % 10, seed=5)
digest = hashlib.sha256()
for epoch in reversed(range(4)):
    plan = planner.plan(epoch)
    for rank in range(args["m"]):
        digest.update(plan.indices(rank).tobytes())
        for dst, ids in sorted(plan.sends(rank).items()):
            digest.update(np.int64(dst).tobytes() + ids.tobytes())
print(digest.hexdigest())
"""


@pytest.mark.parametrize(
    ("strategy", "q", "partition"),
    [("global", 0.0, "random"), ("local", 0.0, "label-sorted"), ("partial", 0.25, "stratified")],
)
def test_plans_are_identical_in_fresh_processes(strategy, q, partition):
    args = json.dumps({"n": 70_001, "m": 6, "strategy": strategy, "q": q, "partition": partition})
    runs = {
        subprocess.run(
            [sys.executable, "-c", FRESH_PROCESS, args],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
        for _ in range(2)
    }
    assert len(runs) == 1 and len(runs.pop().strip()) == 64


def _class_counts(planner, rank, num_classes):
    return np.bincount(planner.labels[planner.plan(0).holdings(rank)], minlength=num_classes)


@given(st.integers(1, 20), st.integers(1, 32), st.integers(1, 200), st.integers(0, 2**20))
def test_label_sorted_ranks_span_few_classes(num_classes, world, per_class, seed):
    num = max(world, num_classes * per_class)
    labels = np.arange(num) % num_classes  # balanced: class sizes differ by at most one
    planner = ShufflePlanner(num, world, strategy="local", partition="label-sorted", labels=labels, seed=seed)
    for rank in range(world):
        spanned = np.count_nonzero(_class_counts(planner, rank, num_classes))
        assert spanned <= math.ceil(num_classes / world) + 1


@given(st.integers(1, 20), st.integers(1, 32), st.integers(0, 2000), st.integers(0, 2**20))
def test_stratified_ranks_match_the_class_proportions(num_classes, world, extra, seed):
    num = world + extra
    labels = np.random.default_rng(seed).integers(0, num_classes, size=num)  # imbalanced too
    planner = ShufflePlanner(num, world, strategy="local", partition="stratified", labels=labels, seed=seed)
    dataset = np.bincount(labels, minlength=num_classes)
    for rank in range(world):
        counts = _class_counts(planner, rank, num_classes)
        assert np.all(np.abs(counts - dataset / world) < 1)


def test_label_partitions_read_labels_of_any_integer_form():
    import torch

    labels = np.arange(100) % 4
    for form in (labels.tolist(), torch.tensor(labels), labels.astype(np.float32), labels.astype(np.uint8)):
        planner = ShufflePlanner(100, 4, strategy="local", partition="label-sorted", labels=form)
        assert set(planner.labels[planner.plan(0).holdings(0)].tolist()) == {0}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_samples=3, world_size=4), r"num_samples \(3\) is smaller than world_size \(4\)"),
        (dict(world_size=0), "world_size must be at least 1"),
        (dict(fraction=1.5, strategy="partial"), r"fraction must be in \[0, 1\]"),
        (dict(fraction=-0.1, strategy="partial"), r"fraction must be in \[0, 1\]"),
        (dict(fraction=float("nan"), strategy="partial"), r"fraction must be in \[0, 1\]"),
        (dict(fraction="lots", strategy="partial"), "fraction must be a number"),
        (dict(fraction=0.5, strategy="local"), "has no effect with strategy 'local'; use strategy 'partial'"),
        (
            dict(strategy="sorted"),
            "unknown strategy 'sorted'; choose one of: corgipile, global, importance, local, partial",
        ),
        (dict(partition="by-color"), "unknown partition 'by-color'; choose one of: contiguous, label-sorted"),
        (dict(partition="label-sorted"), "partition 'label-sorted' needs labels: pass labels="),
        (dict(partition="stratified"), "partition 'stratified' needs labels"),
        (dict(partition="stratified", labels=[0, 1]), r"one class per sample \(10\), got shape \(2,\)"),
        (dict(partition="stratified", labels=np.full(10, 0.5)), "labels must be integer class ids"),
        (dict(seed=-(2**63) - 1), "seed must be at least"),
        (dict(seed=2**64), "seed must fit in 64 bits"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(drop_last="yes"), "drop_last must be True or False"),
        (dict(warmup_epochs=3), r"unknown option\(s\) warmup_epochs for strategy 'global'"),
    ],
)
def test_bad_input_names_the_argument_and_the_fix(kwargs, message):
    arguments = {"num_samples": 10, "world_size": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        ShufflePlanner(arguments.pop("num_samples"), arguments.pop("world_size"), **arguments)


def test_a_negative_seed_plans_as_distributed_sampler_takes_it():
    """DistributedSampler takes any int64 seed; so do the planner and ShuffleSampler: a negative
    seed gives its own plan, the same in every process, and every invariant holds."""
    import torch
    from torch.utils.data import DistributedSampler

    from reshuffle import ShuffleSampler
    from reshuffle.plan.checks import check_planner

    plans = [ShufflePlanner(50, 2, strategy="partial", fraction=0.3, seed=seed) for seed in (-1, -1, 1)]
    assert np.array_equal(plans[0].plan(2).indices(0), plans[1].plan(2).indices(0))
    assert not np.array_equal(plans[0].plan(2).indices(0), plans[2].plan(2).indices(0))
    assert check_planner(plans[0], epochs=3) == []
    ours = ShuffleSampler(list(range(50)), num_replicas=2, rank=0, seed=-7)
    theirs = DistributedSampler(list(range(50)), num_replicas=2, rank=0, seed=-7)
    assert len(list(ours)) == len(list(theirs)) == 25
    assert torch.tensor(list(ours)).unique().numel() == 25


def test_plan_rejects_bad_epochs_and_ranks():
    planner = ShufflePlanner(10, 2)
    with pytest.raises(ValueError, match="epoch must be at least 0"):
        planner.plan(-1)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        planner.plan(0).indices(2)


def test_state_dict_round_trips_and_refuses_another_configuration():
    planner = ShufflePlanner(100, 4, strategy="partial", fraction=0.1, seed=3)
    state = planner.state_dict()
    twin = ShufflePlanner(100, 4, strategy="partial", fraction=0.1, seed=3)
    twin.load_state_dict(state)
    other = ShufflePlanner(100, 4, strategy="partial", fraction=0.2, seed=3)
    with pytest.raises(ValueError, match=r"fraction: saved 0.1, this planner has 0.2"):
        other.load_state_dict(state)


def test_corgipile_reads_whole_blocks_through_a_buffer():
    """corgipile keeps each rank's partition (like local); its order visits every block once, in
    a shuffled order, shuffling samples only among the buffer's blocks: with a cache of
    buffer_blocks blocks a rank reads each of its blocks exactly once per epoch, where a uniformly
    random order reads nearly a block per sample. The order differs from epoch to epoch."""
    from reshuffle.plan.quality import block_reads

    options = {"block_size": 50, "buffer_blocks": 4}
    corgi = ShufflePlanner(20_000, 4, strategy="corgipile", partition="contiguous", seed=5, **options)
    local = ShufflePlanner(20_000, 4, strategy="local", partition="contiguous", seed=5)
    for epoch in (0, 1):
        for rank in range(4):
            order, held = corgi.plan(epoch).indices(rank), corgi.plan(epoch).holdings(rank)
            assert np.array_equal(np.sort(order), held) and np.array_equal(
                held, local.plan(epoch).holdings(rank)
            )
            blocks = np.unique(held // 50).size
            assert block_reads(order, 50, 4) == blocks == 100
            assert block_reads(local.plan(epoch).indices(rank), 50, 4) > 0.9 * held.size
            windows = order.reshape(-1, 200)  # each buffer: 4 whole blocks, shuffled among themselves
            assert all(np.unique(w // 50).size == 4 for w in windows)
    assert not np.array_equal(corgi.plan(0).indices(0), corgi.plan(1).indices(0))
    with pytest.raises(ValueError, match="block_size and buffer_blocks >= 1"):
        ShufflePlanner(100, 2, strategy="corgipile", block_size=0).plan(0).indices(0)


def test_partial_with_block_units_moves_whole_runs_of_consecutive_ids():
    """unit=block with a contiguous partition: what leaves a rank is whole blocks of block_size
    consecutive ids (each block to one rank), k rounded to whole blocks; select=importance is
    refused with it."""
    planner = ShufflePlanner(
        10_000,
        4,
        strategy="partial",
        fraction=0.1,
        partition="contiguous",
        seed=2,
        unit="block",
        block_size=25,
    )
    assert planner.strategy.k == 250  # round(0.1 * 2500) = 250: 10 blocks of 25
    for epoch in (0, 1, 2):
        for rank in range(4):
            sends = planner.plan(epoch).sends(rank)
            assert sum(ids.size for ids in sends.values()) == 250
            if epoch == 0:
                for ids in sends.values():
                    runs = np.split(ids, np.flatnonzero(np.diff(ids) != 1) + 1)
                    assert all(run.size % 25 == 0 and run[0] % 25 == 0 for run in runs), runs
    with pytest.raises(ValueError, match="unit='block' needs block_size >= 1 and select='random'"):
        ShufflePlanner(100, 2, strategy="partial", fraction=0.5, unit="block", select="importance")
