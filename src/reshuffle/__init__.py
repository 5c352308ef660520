"""reshuffle: data shuffling strategies for data-parallel training, made real and comparable.

The two names most users need:

* :class:`ShufflePlanner`: which samples each rank holds, trains on and exchanges, per epoch.
* :class:`ShuffleSampler`: a drop-in for ``torch.utils.data.DistributedSampler`` that follows
  a planner (index mode: every rank can read the whole dataset).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from reshuffle.plan import PARTITIONS, STRATEGIES, EpochPlan, ShufflePlanner

try:
    __version__ = version("reshuffle")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"


def __getattr__(name: str) -> object:
    # The sampler imports torch; keep `import reshuffle` (and the planner) torch-free.
    if name == "ShuffleSampler":
        from reshuffle.sampler import ShuffleSampler

        return ShuffleSampler
    raise AttributeError(f"module 'reshuffle' has no attribute {name!r}")


__all__ = ["PARTITIONS", "STRATEGIES", "EpochPlan", "ShufflePlanner", "ShuffleSampler", "__version__"]
