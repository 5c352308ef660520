"""Shuffle-quality metrics, pure functions of plans (no training needed).

* **churn**: fraction of a rank's holdings that is new since the previous epoch. Expected:
  ``global`` (M-1)/M, ``partial`` k/n (about Q), ``local`` 0.
* **coverage**: fraction of the dataset a rank has trained on so far. Expected for ``global``:
  ``1 - (1 - 1/M)^E`` after E epochs; ``local`` stays at its own 1/M.
* **label distance**: Jensen-Shannon distance (base 2, in [0, 1]) between the label distribution
  a rank trains on and the dataset's; 0 is IID, 1 is disjoint classes.
* **order entropy**: MosaicML streaming's shuffle-quality measure, the Shannon entropy in bits of
  the absolute differences between consecutive ids of an order; 0 for a sorted run, about
  ``log2(n)`` for a random order of n ids drawn from a large range.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from reshuffle.plan.planner import EpochPlan, ShufflePlanner


def churn(previous_holdings: ArrayLike, current_holdings: ArrayLike) -> float:
    """Fraction of ``current_holdings`` not in ``previous_holdings`` (both sets of ids)."""
    current = np.asarray(current_holdings)
    if current.size == 0:
        return 0.0
    return float(np.count_nonzero(~np.isin(current, previous_holdings)) / current.size)


def class_ids(labels: ArrayLike) -> NDArray[np.int64]:
    """Labels renumbered ``0 .. C-1`` (in sorted label order), so they can index counts."""
    return np.unique(np.asarray(labels), return_inverse=True)[1].ravel().astype(np.int64)


def js_distance(p: ArrayLike, q: ArrayLike) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between two distributions (or counts)."""
    first, second = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    first, second = first / first.sum(), second / second.sum()
    middle = (first + second) / 2

    def kl(a: NDArray[np.float64]) -> float:
        nonzero = a > 0
        return float(np.sum(a[nonzero] * np.log2(a[nonzero] / middle[nonzero])))

    return float(np.sqrt(max(0.0, (kl(first) + kl(second)) / 2)))


def label_distance(ids: ArrayLike, labels: ArrayLike) -> float:
    """Jensen-Shannon distance between the labels of ``ids`` and those of the whole dataset."""
    classes = class_ids(labels)
    num_classes = int(classes.max()) + 1
    return js_distance(
        np.bincount(classes[np.asarray(ids)], minlength=num_classes),
        np.bincount(classes, minlength=num_classes),
    )


def order_entropy(order: ArrayLike) -> float:
    """Entropy in bits of ``|order[i+1] - order[i]|`` (MosaicML streaming's shuffle quality)."""
    ids = np.asarray(order, dtype=np.int64)
    if ids.size < 2:
        return 0.0
    counts = np.unique(np.abs(np.diff(ids)), return_counts=True)[1]
    probabilities = counts / (ids.size - 1)
    return float(-np.sum(probabilities * np.log2(probabilities)))


def expected_churn(planner: ShufflePlanner) -> float | None:
    """Closed-form mean churn per epoch for the planner's strategy, where one exists."""
    return planner.strategy.expected_churn(planner.layout, planner.fraction)


def expected_coverage(planner: ShufflePlanner, epochs: int) -> float | None:
    """Closed-form mean coverage after ``epochs`` epochs, where one exists."""
    if epochs < 1:
        return 0.0
    return planner.strategy.expected_coverage(planner.layout, planner.fraction, epochs)


@dataclass(frozen=True)
class EpochQuality:
    """Shuffle quality of one epoch, averaged over the ranks measured."""

    epoch: int
    churn: float | None  # None at epoch 0: nothing to compare with
    expected_churn: float | None
    coverage: float
    expected_coverage: float | None
    label_distance: float | None  # mean over ranks; None without labels
    label_distance_max: float | None
    order_entropy: float  # bits, mean over ranks
    order_entropy_max: float  # log2(samples_per_rank - 1): entropy if every gap were distinct


def measure(planner: ShufflePlanner, epochs: int, ranks: Sequence[int] | None = None) -> list[EpochQuality]:
    """Quality of epochs ``0 .. epochs-1`` over ``ranks`` (default: all).

    Memory is one byte per sample per measured rank (the coverage masks).
    """
    ranks = list(range(planner.world_size)) if ranks is None else [int(r) for r in ranks]
    seen = {rank: np.zeros(planner.num_samples, dtype=bool) for rank in ranks}
    classes = None if planner.labels is None else class_ids(planner.labels)
    num_classes = 0 if classes is None else int(classes.max()) + 1
    dataset = None if classes is None else np.bincount(classes, minlength=num_classes)
    previous: EpochPlan | None = None
    rows = []
    for epoch in range(epochs):
        plan = planner.plan(epoch)
        churns, coverages, distances, entropies = [], [], [], []
        for rank in ranks:
            order = plan.indices(rank)
            seen[rank][order] = True
            coverages.append(np.count_nonzero(seen[rank]) / planner.num_samples)
            entropies.append(order_entropy(order))
            if previous is not None:
                churns.append(churn(previous.holdings(rank), plan.holdings(rank)))
            if classes is not None and dataset is not None:
                distances.append(js_distance(np.bincount(classes[order], minlength=num_classes), dataset))
        rows.append(
            EpochQuality(
                epoch=epoch,
                churn=float(np.mean(churns)) if churns else None,
                expected_churn=expected_churn(planner) if epoch else None,
                coverage=float(np.mean(coverages)),
                expected_coverage=expected_coverage(planner, epoch + 1),
                label_distance=float(np.mean(distances)) if distances else None,
                label_distance_max=float(np.max(distances)) if distances else None,
                order_entropy=float(np.mean(entropies)),
                order_entropy_max=float(np.log2(max(1, plan.samples_per_rank - 1))),
            )
        )
        previous = plan
    return rows


@dataclass(frozen=True)
class NodeQuality:
    """Shuffle quality of one epoch at the node level (a node holds what its ranks hold)."""

    epoch: int
    churn: float | None  # share of a node's holdings new since the previous epoch; None at 0
    label_distance: float | None  # Jensen-Shannon distance of a node's holdings, mean over nodes
    label_distance_max: float | None
    moved_across: float  # share of the holdings sent to other nodes after this epoch, mean over nodes


def measure_nodes(planner: ShufflePlanner, epochs: int, ranks_per_node: int) -> list[NodeQuality]:
    """Node-level quality of epochs ``0 .. epochs-1``, nodes being ``ranks_per_node`` consecutive
    ranks (for any plan: a rank-level plan too, to see what its nodes hold). Replays every rank."""
    if ranks_per_node < 1 or planner.world_size % ranks_per_node:
        raise ValueError(f"ranks per node {ranks_per_node} must divide the {planner.world_size} ranks")
    nodes = planner.world_size // ranks_per_node
    classes = None if planner.labels is None else class_ids(planner.labels)
    dataset = None if classes is None else np.bincount(classes)
    previous: list[NDArray[np.int64]] | None = None
    rows = []
    for epoch in range(epochs):
        plan = planner.plan(epoch)
        members = [range(n * ranks_per_node, (n + 1) * ranks_per_node) for n in range(nodes)]
        held = [np.concatenate([plan.holdings(r) for r in ranks]) for ranks in members]
        across = [
            sum(ids.size for r in ranks for dst, ids in plan.sends(r).items() if dst // ranks_per_node != n)
            / held[n].size
            for n, ranks in enumerate(members)
        ]
        distances = (
            []
            if classes is None or dataset is None
            else [js_distance(np.bincount(classes[ids], minlength=dataset.size), dataset) for ids in held]
        )
        rows.append(
            NodeQuality(
                epoch=epoch,
                churn=None
                if previous is None
                else float(np.mean([churn(a, b) for a, b in zip(previous, held, strict=True)])),
                label_distance=float(np.mean(distances)) if distances else None,
                label_distance_max=float(np.max(distances)) if distances else None,
                moved_across=float(np.mean(across)),
            )
        )
        previous = held
    return rows


def block_reads(order: NDArray[np.int64], block_size: int, cache_blocks: int) -> int:
    """Blocks (runs of ``block_size`` consecutive ids) read to train in ``order`` when the reader
    keeps the last ``cache_blocks`` blocks it read (least recently used first out): the I/O of an
    order over data read sequentially. A sequential scan reads each block once; a uniformly
    random order over many blocks reads about one block per sample."""
    from collections import OrderedDict

    cache: OrderedDict[int, None] = OrderedDict()
    reads = 0
    for block in (np.asarray(order) // block_size).tolist():
        if block in cache:
            cache.move_to_end(block)
            continue
        reads += 1
        cache[block] = None
        if len(cache) > cache_blocks:
            cache.popitem(last=False)
    return reads
