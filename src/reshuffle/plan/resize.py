"""Elastic resume: a sampler state saved by M ranks continued by M' ranks.

At an epoch boundary the next epoch is simply planned for M' ranks: the plan the job would have
had with M' ranks from the start, from the same seed (``local`` keeps the M'-rank partition from
then on; ``partial`` follows the M'-rank exchange chain; ``importance`` keeps every loss it
observed, which is per sample). Mid-epoch, the samples no rank had trained yet in that epoch are
dealt out over the M' ranks (step by step, as the M ranks would have met them, then round-robin),
so each is trained once, and every rank gets the same count: up to M' - 1 repeats of a rank's own
share pad it (or, with ``drop_last``, up to M' - 1 are dropped), as DistributedSampler does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from reshuffle.plan.planner import ShufflePlanner, check_same_config


def saved_planner(
    planner: ShufflePlanner, config: Mapping[str, Any], state: Mapping[str, Any]
) -> ShufflePlanner:
    """The planner a state of ``config`` (another world size) was saved by, with its state."""
    mine = {**planner.config, "world_size": config.get("world_size")}
    check_same_config(mine, config, what="sampler (but for its world size)")
    old = ShufflePlanner(
        planner.num_samples, int(config["world_size"]), strategy=planner.strategy_name,
        fraction=planner.fraction, partition=planner.partition_name, labels=planner.labels,
        seed=planner.seed, drop_last=planner.drop_last, ranks_per_node=int(config.get("ranks_per_node", 1)),
        **planner.options,
    )  # fmt: skip
    old.load_state_dict(state)
    return old


def adopt_observations(planner: ShufflePlanner, state: Mapping[str, Any]) -> None:
    """Give ``planner`` what a planner of another world size observed (per-sample losses)."""
    observed = state.get("strategy", {})
    if observed and planner.strategy_name != "importance":
        raise ValueError(
            f"strategy {planner.strategy_name!r} with loss-driven selection keeps state per rank; it cannot "
            "resume at another world size: resume with the saved number of ranks"
        )
    planner.strategy.load_state_dict(observed)


def deal_rest(old: ShufflePlanner, epoch: int, position: int, rank: int, world: int) -> NDArray[np.int64]:
    """Rank ``rank`` of ``world``'s share of what the ``old`` ranks had not trained in ``epoch``
    after ``position`` steps each."""
    orders = np.stack([old.plan(epoch).indices(r) for r in range(old.world_size)])
    trained = np.unique(orders[:, :position])
    rest = orders[:, position:].T.reshape(-1)  # step by step over the old ranks
    _, first = np.unique(rest, return_index=True)
    rest = rest[np.sort(first)]
    rest = rest[~np.isin(rest, trained)]
    size = rest.size // world if old.drop_last else -(-rest.size // world)
    mine = rest[rank::world]
    if mine.size == 0:
        mine = rest  # fewer samples left than ranks: pad from what is left
    return np.resize(mine, size).astype(np.int64) if size else np.empty(0, dtype=np.int64)
