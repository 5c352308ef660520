"""Shuffle quality at any scale, from the real planner: one rank's churn, coverage and mixing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reshuffle.plan import ShufflePlanner
from reshuffle.plan.quality import measure


@dataclass(frozen=True)
class Quality:
    churn: float  # mean share of rank 0's holdings replaced per epoch (epochs >= 1)
    coverage: float  # share of the data set rank 0 has held after the epochs measured
    mixing_bits: float  # entropy of the gaps between consecutive ids in rank 0's order


def planner_quality(
    num_samples: int, workers: int, name: str, fraction: float, epochs: int
) -> Quality | None:
    """Quality of rank 0 over ``epochs`` epochs of the real planner (O(N) memory: one coverage
    mask); None for strategies whose plans depend on training (importance)."""
    if name == "importance" or epochs < 1:
        return None
    planner = ShufflePlanner(num_samples, workers, strategy=name, fraction=fraction, seed=0)
    rows = measure(planner, epochs, ranks=[0])
    churns = [r.churn for r in rows if r.churn is not None]
    return Quality(
        churn=float(np.mean(churns)) if churns else 0.0,
        coverage=rows[-1].coverage,
        mixing_bits=float(np.mean([r.order_entropy for r in rows])),
    )
