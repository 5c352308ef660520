"""``reshuffle simulate``: a cost model plus the real planner, for scales no machine here has.

``model`` prices one worker's epoch per strategy (compute, exchange or remote reads, what overlap
hides, SyncBatchNorm); ``presets`` holds the workloads and clusters, and calibration from a
benchmark record; ``quality`` runs the real planner for churn, coverage and mixing.
"""

from reshuffle.simulate.model import (
    Cluster,
    Prediction,
    StrategySpec,
    Workload,
    crossover,
    predict,
    syncbn_step_s,
)
from reshuffle.simulate.presets import CLUSTERS, WORKLOADS, calibrated, load_record

__all__ = [
    "CLUSTERS",
    "WORKLOADS",
    "Cluster",
    "Prediction",
    "StrategySpec",
    "Workload",
    "calibrated",
    "crossover",
    "load_record",
    "predict",
    "syncbn_step_s",
]
