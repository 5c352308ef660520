"""Shuffling strategies, one per module, registered here by name.

Adding a strategy means adding a module with a :class:`~reshuffle.plan.strategies.base.Strategy`
subclass and one line below; no other strategy changes.
"""

from __future__ import annotations

from reshuffle.plan.strategies.base import PlanContext, Strategy
from reshuffle.plan.strategies.corgipile import CorgiPileStrategy
from reshuffle.plan.strategies.global_shuffle import GlobalStrategy
from reshuffle.plan.strategies.importance import ImportanceStrategy
from reshuffle.plan.strategies.local import LocalStrategy
from reshuffle.plan.strategies.partial import PartialStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (GlobalStrategy, LocalStrategy, PartialStrategy, ImportanceStrategy, CorgiPileStrategy)
}

__all__ = ["STRATEGIES", "PlanContext", "Strategy"]
