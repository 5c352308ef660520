"""The planning layer: pure, deterministic, numpy only."""

from __future__ import annotations

from reshuffle.plan.layout import Layout
from reshuffle.plan.partitions import PARTITIONS, InitialPartition
from reshuffle.plan.planner import EpochPlan, ShufflePlanner
from reshuffle.plan.strategies import STRATEGIES, PlanContext, Strategy

__all__ = [
    "PARTITIONS",
    "STRATEGIES",
    "EpochPlan",
    "InitialPartition",
    "Layout",
    "PlanContext",
    "ShufflePlanner",
    "Strategy",
]
