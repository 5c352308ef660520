from __future__ import annotations

import itertools

import numpy as np
import pytest

from reshuffle import ShufflePlanner
from reshuffle.plan import quality


def test_churn_of_sets():
    assert quality.churn([1, 2, 3, 4], [3, 4, 5, 6]) == 0.5
    assert quality.churn([1, 2], [1, 2]) == 0.0
    assert quality.churn([], [7]) == 1.0


@pytest.mark.parametrize(
    ("strategy", "fraction", "expected"),
    [("global", 0.0, 7 / 8), ("local", 0.0, 0.0), ("partial", 0.25, 0.25), ("partial", 0.01, 0.01)],
)
def test_measured_churn_matches_its_expectation(strategy, fraction, expected):
    planner = ShufflePlanner(16_000, 8, strategy=strategy, fraction=fraction, seed=1)
    rows = quality.measure(planner, epochs=4)
    assert rows[0].churn is None
    assert quality.expected_churn(planner) == pytest.approx(expected)
    for row in rows[1:]:
        assert row.expected_churn == pytest.approx(expected)
        assert row.churn == pytest.approx(expected, abs=0.01)


def test_global_coverage_follows_one_minus_one_minus_one_over_m_to_the_e():
    planner = ShufflePlanner(20_000, 4, strategy="global", seed=2)
    for row in quality.measure(planner, epochs=6, ranks=[0, 3]):
        expected = 1 - (1 - 1 / 4) ** (row.epoch + 1)
        assert row.expected_coverage == pytest.approx(expected)
        assert row.coverage == pytest.approx(expected, abs=0.01)


def test_local_coverage_stays_at_its_partition_and_partial_grows():
    local = quality.measure(ShufflePlanner(4000, 4, strategy="local"), epochs=5)
    assert [row.coverage for row in local] == pytest.approx([0.25] * 5)
    partial = quality.measure(ShufflePlanner(4000, 4, strategy="partial", fraction=0.2), epochs=5)
    coverages = [row.coverage for row in partial]
    assert coverages[0] == pytest.approx(0.25)
    assert all(b > a for a, b in itertools.pairwise(coverages))
    assert partial[0].expected_coverage is None  # no closed form, and the table says so


def test_label_distance_is_zero_for_iid_and_one_for_disjoint_classes():
    labels = np.repeat([0, 1], 50)
    assert quality.label_distance(np.arange(100), labels) == pytest.approx(0.0)
    # p = [1, 0] against q = [1/2, 1/2]: m = [3/4, 1/4], JS = (log2(4/3) + (log2(2/3) + 1) / 2) / 2
    expected = np.sqrt((np.log2(4 / 3) + (np.log2(2 / 3) + 1) / 2) / 2)
    assert quality.label_distance(np.arange(50), labels) == pytest.approx(expected)
    assert expected == pytest.approx(0.5579, abs=1e-4)
    assert quality.js_distance([1, 0], [0, 1]) == pytest.approx(1.0)
    assert quality.js_distance([2, 2], [5, 5]) == pytest.approx(0.0)


def test_label_sorted_local_stays_far_from_iid_while_partial_mixes():
    labels = np.arange(10_000) % 10
    kwargs = dict(partition="label-sorted", labels=labels, seed=3)
    local = quality.measure(ShufflePlanner(10_000, 10, strategy="local", **kwargs), epochs=6)
    partial = quality.measure(
        ShufflePlanner(10_000, 10, strategy="partial", fraction=0.5, **kwargs), epochs=6
    )
    stratified = quality.measure(
        ShufflePlanner(10_000, 10, strategy="local", partition="stratified", labels=labels), epochs=1
    )
    assert local[-1].label_distance == pytest.approx(0.8708, abs=1e-3)  # one class of ten per rank
    assert partial[-1].label_distance < 0.2 < partial[0].label_distance
    assert stratified[0].label_distance_max < 0.01


def test_order_entropy_is_zero_when_sorted_and_near_log2_n_when_random():
    assert quality.order_entropy(np.arange(1000)) == 0.0
    assert quality.order_entropy([5]) == 0.0
    random_order = np.random.default_rng(0).permutation(100_000)[:1000]
    assert quality.order_entropy(random_order) > 0.95 * np.log2(999)
    rows = quality.measure(ShufflePlanner(100_000, 4, strategy="global"), epochs=1, ranks=[0])
    assert rows[0].order_entropy > 0.9 * rows[0].order_entropy_max
