from __future__ import annotations

import numpy as np
import pytest

from reshuffle.plan.permutation import TABLE_LIMIT, FeistelPermutation, KeyedPermutation


@pytest.mark.parametrize("size", [1, 2, 3, 5, 16, 17, 97, 1000, TABLE_LIMIT, TABLE_LIMIT + 1, 300_001])
def test_is_a_bijection_with_an_exact_inverse(size):
    perm = KeyedPermutation(size, key=(7, size))
    ids = perm.forward(np.arange(size))
    assert np.array_equal(np.sort(ids), np.arange(size))
    assert np.array_equal(perm.inverse(ids), np.arange(size))


def test_wide_domains_use_64_bit_arithmetic():
    size = 2**33 + 5
    perm = KeyedPermutation(size, key=1)
    positions = np.array([0, 1, 2**32, size - 1], dtype=np.int64)
    ids = perm.forward(positions)
    assert ids.min() >= 0 and ids.max() < size
    assert np.array_equal(perm.inverse(ids), positions)


def test_same_key_same_permutation_and_other_key_other_permutation():
    a = KeyedPermutation(1000, key=(1, 2)).forward(np.arange(1000))
    b = KeyedPermutation(1000, key=(1, 2)).forward(np.arange(1000))
    c = KeyedPermutation(1000, key=(1, 3)).forward(np.arange(1000))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_pointwise_evaluation_matches_the_full_permutation():
    perm = KeyedPermutation(5000, key=3)
    full = perm.forward(np.arange(5000))
    picks = np.array([4999, 0, 17, 17, 2500])
    assert np.array_equal(perm.forward(picks), full[picks])


def _chi2_per_dof(permute, size: int, keys: int) -> float:
    # Chi-squared of "element i lands at position j" over many keys; uniform gives about 1 per
    # degree of freedom (+- 0.05 here). Keys are fixed, so the statistic is deterministic.
    counts = np.zeros((size, size))
    for key in range(keys):
        counts[np.arange(size), permute(size, key)] += 1
    expected = keys / size
    return float(((counts - expected) ** 2 / expected).sum() / (size - 1) ** 2)


@pytest.mark.parametrize("size", [7, 33])
def test_small_domains_are_exactly_uniform(size):
    chi2 = _chi2_per_dof(lambda n, key: KeyedPermutation(n, key=key).forward(np.arange(n)), size, 4000)
    assert 0.85 < chi2 < 1.15


def test_feistel_network_is_uniform_from_a_few_dozen_ids():
    def permute(n, key):
        return FeistelPermutation(n, key=key).apply(np.arange(n), inverse=False)

    assert np.array_equal(np.sort(permute(33, 0)), np.arange(33))
    assert 0.85 < _chi2_per_dof(permute, 33, 4000) < 1.15


def test_large_domains_go_through_the_network_and_look_random():
    size = 1_000_003
    ids = KeyedPermutation(size, key=5).forward(np.arange(size))
    assert np.array_equal(np.sort(ids), np.arange(size))
    # Neighbouring positions land far apart, and each tenth of the positions spreads evenly.
    assert np.median(np.abs(np.diff(ids))) > size / 5
    tenths = np.bincount(ids[: size // 10] * 10 // size, minlength=10)
    assert tenths.min() > 0.95 * size / 100


def test_out_of_range_values_are_rejected():
    perm = KeyedPermutation(10, key=0)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        perm.forward([10])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        perm.inverse([-1])
    with pytest.raises(ValueError, match="at least 1"):
        KeyedPermutation(0, key=0)
