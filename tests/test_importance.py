"""Importance-aware partitioning and importance-guided partial exchange."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reshuffle import ShufflePlanner
from reshuffle.losses import LossTracker
from reshuffle.plan.checks import check_planner, feed_losses
from reshuffle.plan.importance import LossWindow, assign, owners, rank_by_importance, weighted_choice
from reshuffle.plan.layout import Layout
from reshuffle.plan.strategies.partial import moves_per_epoch
from spawn import run_ranks

# ----------------------------------------------------------------------------- pure parts


def test_importance_measures_are_the_mean_and_unbiased_variance_over_epochs():
    rng = np.random.default_rng(0)
    losses = rng.random((4, 50))
    window = LossWindow(50)
    for epoch, row in enumerate(losses):
        window.add(epoch, np.arange(50), row)
    assert np.allclose(window.importance("mean"), losses.mean(axis=0))
    assert np.allclose(window.importance("variance"), losses.var(axis=0, ddof=1))
    partial = LossWindow(5)
    partial.add(0, np.array([0, 1]), np.array([2.0, 4.0]))
    assert partial.importance("mean").tolist() == [2.0, 4.0, 3.0, 3.0, 3.0]  # unseen: mean of seen
    with pytest.raises(ValueError, match="not finite"):
        partial.add(1, np.array([0]), np.array([np.nan]))
    with pytest.raises(ValueError, match="unknown importance measure 'median'"):
        partial.importance("median")


def test_rank_by_importance_sorts_descending_with_ties_by_id():
    assert rank_by_importance(np.array([1.0, 3.0, 3.0, 0.5, 3.0])).tolist() == [1, 2, 4, 0, 3]


@pytest.mark.parametrize(("num", "world"), [(10, 3), (12, 4), (7, 7), (100, 1)])
def test_stripes_and_blocks_deal_out_balanced_partitions(num, world):
    layout = Layout(num, world)
    order = np.random.default_rng(num).permutation(num)
    for assignment in ("stripes", "blocks"):
        parts = [assign(order, layout, assignment, rank) for rank in range(world)]
        assert [p.size for p in parts] == [layout.size(r) for r in range(world)]
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(num))
        rank_of = owners(order, layout, assignment)
        assert all((rank_of[p] == r).all() for r, p in enumerate(parts))
    stripes = [assign(order, layout, "stripes", r) for r in range(world)]
    assert all(np.array_equal(stripes[r], order[r::world]) for r in range(world))
    assert np.array_equal(assign(order, layout, "blocks", 0), order[: layout.size(0)])  # the hardest


def test_weighted_choice_is_exact_k_deterministic_and_follows_the_weights():
    weights = np.ones(100)
    weights[:10] = 20.0
    picks = [weighted_choice(weights, 10, np.random.default_rng(seed)) for seed in range(300)]
    assert all(p.size == 10 and np.unique(p).size == 10 for p in picks)
    assert np.array_equal(
        weighted_choice(weights, 10, np.random.default_rng(7)),
        weighted_choice(weights, 10, np.random.default_rng(7)),
    )
    heavy = np.mean([np.isin(p, np.arange(10)).mean() for p in picks])
    assert heavy > 0.6  # uniform would be 0.1
    zeros = weighted_choice(np.zeros(5), 5, np.random.default_rng(0))  # all zero: still exactly k
    assert zeros.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="cannot choose 6 of 5"):
        weighted_choice(np.ones(5), 6, np.random.default_rng(0))


# ----------------------------------------------------------------------------- the strategy


def _planner(num=120, world=4, **options):
    return ShufflePlanner(num, world, strategy="importance", seed=5, **options)


def test_schedule_warmup_is_global_then_fixed_partitions_with_repartitions_every_interval():
    planner = _planner(warmup_epochs=2, interval_epochs=3)
    moved = []
    for epoch in range(9):
        feed_losses(planner, epoch)
        moved.append(any(planner.plan(epoch).sends(r) for r in range(planner.world_size)))
    # sends after epoch e move data into e+1: warm-up (into 1, 2), then re-partitions at 5 and 8
    assert moved == [True, True, False, False, True, False, False, True, False]
    assert [planner.strategy.is_repartition(e) for e in range(9)] == [
        False, False, True, False, False, True, False, False, True
    ]  # fmt: skip
    assert check_planner(_planner(warmup_epochs=1, interval_epochs=2, assignment="blocks"), epochs=6) == []


def test_once_keeps_the_partition_forever():
    planner = _planner(warmup_epochs=1, interval_epochs=0)
    for epoch in range(6):
        feed_losses(planner, epoch)
    first = [planner.plan(1).holdings(r) for r in range(4)]
    assert all(np.array_equal(first[r], planner.plan(5).holdings(r)) for r in range(4))
    assert all(planner.plan(4).sends(r) == {} for r in range(4))


def test_hard_samples_spread_evenly_under_stripes_and_cluster_under_blocks():
    num, world = 400, 4
    hard = np.random.default_rng(1).choice(num, 40, replace=False)
    for assignment, expected in (("stripes", [10, 10, 10, 10]), ("blocks", [40, 0, 0, 0])):
        planner = _planner(num, world, warmup_epochs=2, assignment=assignment)
        for epoch in range(2):
            losses = np.full(num, 0.1) + np.random.default_rng(epoch).random(num) * 0.01
            losses[hard] = 5.0 + np.random.default_rng(epoch).random(hard.size)
            planner.observe(epoch, np.arange(num), losses)
        held = [np.isin(planner.plan(2).holdings(r), hard).sum() for r in range(world)]
        assert held == expected, assignment


def test_ignore_epochs_leaves_the_first_epochs_out_of_the_first_repartition():
    a = _planner(warmup_epochs=3, ignore_epochs=1)
    b = _planner(warmup_epochs=3, ignore_epochs=1)
    rng = np.random.default_rng(3)
    later = [rng.random(120) for _ in range(2)]
    a.observe(0, np.arange(120), np.arange(120.0))  # very different first epochs ...
    b.observe(0, np.arange(120), -np.arange(120.0) + 200)
    for epoch, losses in enumerate(later, start=1):
        a.observe(epoch, np.arange(120), losses)
        b.observe(epoch, np.arange(120), losses)
    assert all(np.array_equal(a.plan(3).holdings(r), b.plan(3).holdings(r)) for r in range(4))  # ... ignored


def test_the_variance_measure_needs_two_epochs_and_options_are_checked():
    with pytest.raises(ValueError, match="measure='variance' needs at least 2"):
        _planner(warmup_epochs=2, ignore_epochs=1, measure="variance")
    with pytest.raises(ValueError, match="unknown assignment 'rows'"):
        _planner(assignment="rows")
    with pytest.raises(ValueError, match="warmup_epochs must be an integer >= 1"):
        _planner(warmup_epochs=0)
    planner = _planner(warmup_epochs=2)
    with pytest.raises(ValueError, match="losses of epochs up to 1, which have not been observed"):
        planner.plan(2).holdings(0)
    feed_losses(planner, 0)
    with pytest.raises(ValueError, match="observe each epoch once, in order"):
        feed_losses(planner, 0)


def test_state_dict_restores_the_scores_instead_of_replaying():
    original = _planner(warmup_epochs=2, interval_epochs=2, measure="variance")
    for epoch in range(3):
        feed_losses(original, epoch)
    state = original.state_dict()
    saved = torch.load(_roundtrip(state), weights_only=True)  # as a checkpoint stores it
    resumed = _planner(warmup_epochs=2, interval_epochs=2, measure="variance")
    resumed.load_state_dict(saved)
    for epoch in range(3, 7):
        feed_losses(original, epoch)
        feed_losses(resumed, epoch)
        for rank in range(4):
            assert np.array_equal(original.plan(epoch).indices(rank), resumed.plan(epoch).indices(rank))
            assert str(original.plan(epoch).sends(rank)) == str(resumed.plan(epoch).sends(rank))


def _roundtrip(state):
    import io

    from reshuffle.plan.planner import plain

    buffer = io.BytesIO()
    torch.save(plain(state), buffer)
    buffer.seek(0)
    return buffer


# ----------------------------------------------------------------------------- partial, select=importance


def _partial(num=403, world=4, fraction=0.2):
    return ShufflePlanner(num, world, strategy="partial", fraction=fraction, seed=2, select="importance")


def test_importance_selection_stays_exact_k_and_deterministic_given_the_losses():
    a, b, c = _partial(), _partial(), _partial()
    k = moves_per_epoch(a.layout, 0.2)
    differs = []
    for epoch in range(5):
        feed_losses(a, epoch)
        feed_losses(b, epoch)
        c.observe(epoch, np.arange(403), np.ones(403))  # other losses: other choices
        differs.append(str(a.plan(epoch + 1).sends(0)) != str(c.plan(epoch + 1).sends(0)))
        for rank in range(4):
            out = sum(ids.size for ids in a.plan(epoch).sends(rank).values())
            assert out == sum(ids.size for ids in a.plan(epoch).receives(rank).values()) == k
            assert rank not in a.plan(epoch).sends(rank)
            assert str(a.plan(epoch).sends(rank)) == str(b.plan(epoch).sends(rank))
    assert any(differs)
    assert check_planner(_partial(101, 3, 0.5), epochs=5) == []


def test_hard_samples_circulate_more_often():
    num, world = 800, 4
    hard = np.arange(0, num, 10)  # 10% of the samples, loss 20x the others
    losses = np.ones(num)
    losses[hard] = 20.0
    planner = _partial(num, world, 0.1)
    sent_hard = sent = 0
    for epoch in range(8):
        planner.observe(epoch, np.arange(num), losses)
        for rank in range(world):
            ids = np.concatenate(list(planner.plan(epoch + 1).sends(rank).values()))
            sent_hard += np.isin(ids, hard).sum()
            sent += ids.size
    assert sent_hard / sent > 0.5  # uniform selection would send about 10% hard samples


# ----------------------------------------------------------------------------- across ranks


def _reduce_scores(rank, world, num):
    import torch

    planner = ShufflePlanner(num, world, strategy="importance", seed=9, warmup_epochs=2)
    tracker = LossTracker(num)
    for epoch in range(2):
        ids = torch.from_numpy(planner.plan(epoch).indices(rank))
        losses = _loss_of(ids.double(), epoch).float()  # what this rank's forward pass would give
        tracker.add(ids, losses)
        tracker.reduce()
        planner.observe(epoch, *(t.numpy() for t in tracker.mean()))
        tracker.reset()
    return planner.strategy._orders[2].tolist(), planner.plan(2).holdings(rank).tolist()


def _loss_of(ids, epoch):
    hard = (ids % 7 == 0).double()
    return 0.2 + 3.0 * hard + 0.001 * ((ids * (epoch + 3)) % 11)


def test_ranks_reduce_the_same_scores_and_partition_by_them():
    num, world = 301, 3
    results = run_ranks(_reduce_scores, world, num, timeout=120)
    orders = [order for order, _ in results]
    assert orders[0] == orders[1] == orders[2]
    ids = torch.arange(num, dtype=torch.float64)
    expected = (_loss_of(ids, 0).float().double() + _loss_of(ids, 1).float().double()) / 2
    assert orders[0] == rank_by_importance(expected.numpy()).tolist()  # every sample, every rank's loss
    hard = set(range(0, num, 7))
    spread = [len(hard & set(held)) for _, held in results]
    assert max(spread) - min(spread) <= 1 and sum(spread) == len(hard)
