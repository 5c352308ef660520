"""reshuffle: data shuffling strategies for data-parallel training, made real and comparable.

The names most users need:

* :class:`ShuffledData`: the data path a training loop drives with ``set_epoch``: a dataset and
  a sampler for any ``DataLoader``, in index mode or in store mode (node-local stores and a real
  sample exchange between ranks, overlapped with training).
* :class:`ShuffleSampler`: a drop-in for ``torch.utils.data.DistributedSampler`` that follows
  a planner (index mode: every rank can read the whole dataset).
* :class:`ShufflePlanner`: which samples each rank holds, trains on and exchanges, per epoch.
* :func:`settle_buckets`: call once after wrapping a model in DDP, so that a resumed job with
  three or more ranks trains to the bit as an uninterrupted one does.
* :func:`keep_freed_memory`: around a training loop on the CPU, so that each step reuses the
  memory the last one freed instead of page-faulting it in afresh (glibc; 1.4-2x per epoch).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from reshuffle.memory import keep_freed_memory
from reshuffle.plan import PARTITIONS, STRATEGIES, EpochPlan, ShufflePlanner

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ imports them on first use
    from reshuffle.ddp import settle_buckets
    from reshuffle.sampler import ShuffleSampler
    from reshuffle.shuffled import ShuffledData

try:
    __version__ = version("reshuffle")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"


def __getattr__(name: str) -> object:
    # The sampler imports torch; keep `import reshuffle` (and the planner) torch-free.
    if name == "ShuffleSampler":
        from reshuffle.sampler import ShuffleSampler

        return ShuffleSampler
    if name == "ShuffledData":
        from reshuffle.shuffled import ShuffledData

        return ShuffledData
    if name == "settle_buckets":
        from reshuffle.ddp import settle_buckets

        return settle_buckets
    raise AttributeError(f"module 'reshuffle' has no attribute {name!r}")


__all__ = [
    "PARTITIONS",
    "STRATEGIES",
    "EpochPlan",
    "ShufflePlanner",
    "ShuffleSampler",
    "ShuffledData",
    "__version__",
    "keep_freed_memory",
    "settle_buckets",
]
