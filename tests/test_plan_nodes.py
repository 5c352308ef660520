"""Node-aware plans (``ranks_per_node``): the strategy runs over nodes, each node re-deals its
samples among its ranks every epoch; the plan guarantees are in test_planner's property tests."""

from __future__ import annotations

import numpy as np
import pytest

from reshuffle import ShufflePlanner
from reshuffle.plan.quality import churn, class_ids

LABELS = np.arange(4000) % 10


def node_holdings(planner: ShufflePlanner, epoch: int, node: int) -> np.ndarray:
    per = planner.ranks_per_node
    plan = planner.plan(epoch)
    return np.sort(np.concatenate([plan.holdings(r) for r in range(node * per, node * per + per)]))


def cross_node(planner: ShufflePlanner, epoch: int, rank: int) -> int:
    per = planner.ranks_per_node
    return sum(ids.size for dst, ids in planner.plan(epoch).sends(rank).items() if dst // per != rank // per)


@pytest.mark.parametrize("partition", ["random", "contiguous", "label-sorted", "stratified"])
def test_node_local_keeps_every_sample_on_its_node_and_redeals_it(partition):
    planner = ShufflePlanner(4000, 16, strategy="local", partition=partition, labels=LABELS, seed=5,
                             ranks_per_node=4)  # fmt: skip
    for node in range(4):
        first = node_holdings(planner, 0, node)
        assert all(np.array_equal(first, node_holdings(planner, e, node)) for e in (1, 2, 7))
    for rank in range(16):
        assert cross_node(planner, 0, rank) == 0 and cross_node(planner, 3, rank) == 0
        assert all(dst // 4 == rank // 4 for dst in planner.plan(1).sends(rank))
    # a rank keeps about 1/R of what it held: the rest is dealt to the node's other ranks
    churns = [churn(planner.plan(e).holdings(r), planner.plan(e + 1).holdings(r)) for e in range(3)
              for r in range(16)]  # fmt: skip
    assert np.mean(churns) == pytest.approx(0.75, abs=0.02)
    assert planner.strategy.expected_churn(planner.layout, 0.0) == 0.75


def test_node_partial_moves_exactly_k_between_nodes():
    planner = ShufflePlanner(4003, 16, strategy="partial", fraction=0.2, seed=1, ranks_per_node=4)
    k = round(0.2 * (4003 // 4))
    for epoch in range(3):
        for node in range(4):
            leaving = sum(cross_node(planner, epoch, r) for r in range(node * 4, node * 4 + 4))
            kept = np.intersect1d(
                node_holdings(planner, epoch, node), node_holdings(planner, epoch + 1, node)
            )
            assert leaving == k and kept.size == node_holdings(planner, epoch, node).size - k


def test_node_partial_with_zero_fraction_is_node_local():
    local = ShufflePlanner(1000, 8, strategy="local", seed=2, ranks_per_node=4)
    partial = ShufflePlanner(1000, 8, strategy="partial", fraction=0.0, seed=2, ranks_per_node=4)
    for epoch in range(3):
        for rank in range(8):
            assert np.array_equal(local.plan(epoch).indices(rank), partial.plan(epoch).indices(rank))


def test_label_sorted_applies_to_nodes():
    """Each node holds a few classes (as a cluster that stages contiguous shards per node); its
    ranks share the node's classes instead of each holding one."""
    nodes = ShufflePlanner(4000, 16, strategy="local", partition="label-sorted", labels=LABELS,
                           ranks_per_node=4)  # fmt: skip
    ranks = ShufflePlanner(4000, 16, strategy="local", partition="label-sorted", labels=LABELS)
    classes = class_ids(LABELS)
    node_classes = [np.unique(classes[node_holdings(nodes, 0, n)]).size for n in range(4)]
    assert max(node_classes) <= 4  # ceil(10 / 4) + 1
    per_rank_nodes = [np.unique(classes[nodes.plan(0).holdings(r)]).size for r in range(16)]
    per_rank_ranks = [np.unique(classes[ranks.plan(0).holdings(r)]).size for r in range(16)]
    assert min(per_rank_nodes) >= 3 and max(per_rank_ranks) <= 2


def test_the_deal_is_uniform_over_a_nodes_ranks():
    planner = ShufflePlanner(400, 8, strategy="local", seed=3, ranks_per_node=4)
    counts = np.zeros((400, 4))
    for epoch in range(200):
        plan = planner.plan(epoch)
        for rank in range(4):
            counts[plan.holdings(rank), rank] += 1
    node0 = counts.sum(axis=1) > 0
    assert np.allclose(counts[node0].sum(axis=1), 200)
    # each sample of node 0 lands on each of its 4 ranks about 50 times in 200 epochs
    assert counts[node0].mean() == pytest.approx(50, abs=1) and counts[node0].std() < 10


def test_one_rank_per_node_is_the_rank_level_plan():
    for strategy, q in (("local", 0.0), ("partial", 0.3), ("global", 0.0)):
        plain = ShufflePlanner(500, 6, strategy=strategy, fraction=q, seed=4)
        one = ShufflePlanner(500, 6, strategy=strategy, fraction=q, seed=4, ranks_per_node=1)
        assert plain.config == one.config
        for rank in range(6):
            assert np.array_equal(plain.plan(2).indices(rank), one.plan(2).indices(rank))
            assert {k: v.tolist() for k, v in plain.plan(2).sends(rank).items()} == {
                k: v.tolist() for k, v in one.plan(2).sends(rank).items()
            }


def test_saved_state_names_a_different_node_size():
    state = ShufflePlanner(500, 8, strategy="partial", fraction=0.1, ranks_per_node=4).state_dict()
    with pytest.raises(ValueError, match="ranks_per_node: saved 4, this planner has None"):
        ShufflePlanner(500, 8, strategy="partial", fraction=0.1).load_state_dict(state)


def test_bad_node_sizes_name_the_fix():
    with pytest.raises(ValueError, match="does not divide the 8 ranks"):
        ShufflePlanner(500, 8, ranks_per_node=3)
    with pytest.raises(ValueError, match="ranks_per_node must be at least 1"):
        ShufflePlanner(500, 8, ranks_per_node=0)
    with pytest.raises(ValueError, match="keeps its own training order"):
        ShufflePlanner(500, 8, strategy="corgipile", ranks_per_node=4)


def test_node_plans_scale_to_a_cluster():
    """N = 10^8, 4,096 ranks on 512 nodes: one rank plans its epoch from its node's share."""
    planner = ShufflePlanner(10**8, 4096, strategy="partial", fraction=0.05, seed=1, ranks_per_node=8)
    plan = planner.plan(2)
    held = plan.holdings(77)
    received = np.concatenate(list(plan.receives(77).values()))
    assert held.size in (24414, 24415) and 0 < received.size < held.size
