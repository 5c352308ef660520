"""The guarantees every plan keeps, as checks that name each violation.

Run them on a new strategy before trusting it::

    problems = check_planner(ShufflePlanner(1000, 8, strategy="mine"), epochs=5)
    assert not problems, problems

Per epoch: holdings are balanced (sizes differ by at most 1) and partition the dataset; every
rank trains on ``samples_per_rank`` ids drawn from its own holdings, each held id exactly once
(plus repeats of its own ids as padding, or minus ``N % M`` ids with ``drop_last``); sends and
receives mirror each other, never target the sender, and turn this epoch's holdings into the
next epoch's. O(N) memory: this replays every rank.
"""

from __future__ import annotations

import numpy as np

from reshuffle.plan import streams
from reshuffle.plan.planner import EpochPlan, ShufflePlanner


def check_epoch(planner: ShufflePlanner, epoch: int) -> list[str]:
    """Violations of the plan guarantees in ``epoch`` and its transition to ``epoch + 1``."""
    plan, following = planner.plan(epoch), planner.plan(epoch + 1)
    world = planner.world_size
    problems: list[str] = []
    holdings = [plan.holdings(rank) for rank in range(world)]
    problems += _check_holdings(epoch, holdings, planner.num_samples)
    problems += _check_indices(plan, holdings, planner.drop_last)
    sends = [plan.sends(rank) for rank in range(world)]
    receives = [plan.receives(rank) for rank in range(world)]
    for rank in range(world):
        if rank in sends[rank] or rank in receives[rank]:
            problems.append(f"epoch {epoch}: rank {rank} sends to or receives from itself")
        for dst, ids in sends[rank].items():
            if not np.array_equal(ids, receives[dst].get(rank, np.empty(0, np.int64))):
                problems.append(f"epoch {epoch}: rank {rank} -> {dst} sends differ from receives")
        for src in receives[rank]:
            if rank not in sends[src]:
                problems.append(f"epoch {epoch}: rank {rank} receives from {src}, which sends nothing")
        out = _concat(sends[rank].values())
        if not np.isin(out, holdings[rank]).all():
            problems.append(f"epoch {epoch}: rank {rank} sends ids it does not hold")
        after = np.union1d(np.setdiff1d(holdings[rank], out), _concat(receives[rank].values()))
        if not np.array_equal(after, following.holdings(rank)):
            problems.append(
                f"epoch {epoch}: rank {rank}'s holdings minus sends plus receives are not its "
                f"holdings in epoch {epoch + 1}"
            )
    return problems


def check_planner(planner: ShufflePlanner, epochs: int) -> list[str]:
    """:func:`check_epoch` for epochs ``0 .. epochs-1``.

    A loss-driven strategy (``uses_losses``) is fed synthetic per-sample losses after each epoch,
    seeded by the epoch, as a trainer would feed real ones.
    """
    problems = []
    for epoch in range(epochs):
        if planner.strategy.uses_losses:
            feed_losses(planner, epoch)
        problems += check_epoch(planner, epoch)
    return problems


def feed_losses(planner: ShufflePlanner, epoch: int) -> None:
    """Observe deterministic stand-in losses for every sample of ``epoch`` (a few hard samples
    among many easy ones, changing with the epoch)."""
    rng = np.random.default_rng((streams.entropy(planner.seed), epoch, 12345))
    losses = rng.exponential(1.0, planner.num_samples) ** 2
    planner.observe(epoch, np.arange(planner.num_samples, dtype=np.int64), losses)


def _check_holdings(epoch: int, holdings: list[np.ndarray], num_samples: int) -> list[str]:
    problems = []
    sizes = [ids.size for ids in holdings]
    if max(sizes) - min(sizes) > 1:
        problems.append(f"epoch {epoch}: unbalanced holdings, sizes {min(sizes)}..{max(sizes)}")
    every = np.sort(_concat(holdings))
    if not np.array_equal(every, np.arange(num_samples)):
        problems.append(f"epoch {epoch}: holdings do not partition the {num_samples} samples")
    if any(ids.dtype != np.int64 or np.any(np.diff(ids) <= 0) for ids in holdings):
        problems.append(f"epoch {epoch}: holdings are not sorted unique int64 arrays")
    return problems


def _check_indices(plan: EpochPlan, holdings: list[np.ndarray], drop_last: bool) -> list[str]:
    problems = []
    epoch = plan.epoch
    for rank, held in enumerate(holdings):
        order = plan.indices(rank)
        if order.dtype != np.int64 or order.size != plan.samples_per_rank:
            problems.append(
                f"epoch {epoch}: rank {rank} trains on {order.size} ids, not {plan.samples_per_rank}"
            )
            continue
        if not np.isin(order, held).all():
            problems.append(f"epoch {epoch}: rank {rank} trains on ids it does not hold")
        unique, counts = np.unique(order, return_counts=True)
        if drop_last:
            if counts.max(initial=1) > 1 or unique.size != min(held.size, plan.samples_per_rank):
                problems.append(f"epoch {epoch}: rank {rank} repeats or skips ids with drop_last")
        elif unique.size != held.size or counts.sum() - unique.size != plan.samples_per_rank - held.size:
            problems.append(f"epoch {epoch}: rank {rank} does not train on every id it holds once")
    trained = np.unique(_concat(plan.indices(rank) for rank in range(len(holdings))))
    expected = plan.num_samples - plan.num_dropped
    if trained.size != expected:
        problems.append(f"epoch {epoch}: {trained.size} distinct ids trained, expected {expected}")
    return problems


def _concat(arrays) -> np.ndarray:
    arrays = list(arrays)
    return np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int64)
