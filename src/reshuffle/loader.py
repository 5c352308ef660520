"""``DeliveredLoader``: a ``DataLoader`` that knows how much of the epoch your loop received.

A ``DataLoader`` with workers takes ids from its sampler ``num_workers * prefetch_factor`` batches
ahead of the loop, so the sampler's own position runs ahead of training: a mid-epoch state taken
from it would skip the prefetched batches on resume. This loader counts the batches it hands to
the loop; :meth:`reshuffle.ShuffledData.state_dict` reads the position from it, so a state taken
anywhere inside the loop resumes at the first batch the loop did not receive, whatever
``num_workers``, ``prefetch_factor`` or ``persistent_workers``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset

from reshuffle.sampler import ShuffleSampler


class DeliveredLoader(DataLoader):
    """``DataLoader(dataset, sampler=sampler, batch_size=..., **options)`` that counts what it
    delivered in the current pass (made by :meth:`reshuffle.ShuffledData.loader`)."""

    def __init__(self, dataset: Dataset, sampler: ShuffleSampler, batch_size: int | None, **options: Any):
        for name in ("sampler", "batch_sampler", "shuffle"):
            if name in options:
                raise ValueError(
                    f"ShuffledData.loader() sets the sampler itself; drop {name}= (the order is the plan's)"
                )
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **options)
        self.plan_sampler = sampler
        self.epoch: int | None = None  # the epoch of the pass in progress (or last run)
        self._start = 0  # the sampler's position when the pass began
        self._batches = 0  # batches handed to the loop in this pass
        self._finished = False

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler = self.plan_sampler
        self.epoch, self._start, self._batches, self._finished = sampler.epoch, sampler.resumed_at, 0, False
        for batch in super().__iter__():
            self._batches += 1
            yield batch
        self._finished = True

    @property
    def position(self) -> int:
        """Samples of the epoch the loop has received (resumed prefix included)."""
        size = self.plan_sampler.epoch_size
        if self._finished:
            return size
        per_batch = 1 if self.batch_size is None else int(self.batch_size)
        return min(size, self._start + self._batches * per_batch)


def trained_position(loader: DeliveredLoader | None, sampler: ShuffleSampler, *, ended: bool) -> int | None:
    """The current epoch's trained position when it is known exactly: what ``loader`` delivered
    in this epoch's pass; None when the sampler's own position is exact (nothing fetched in this
    pass yet, or the loop declared the epoch over: ``ended``). Otherwise a ``ValueError`` naming
    the fixes: a prefetching DataLoader takes the last ids while the loop is still some batches
    short of them, so even a sampler at the epoch's end cannot say whether the loop got there."""
    if loader is not None and loader.epoch == sampler.epoch:
        return loader.position
    if sampler.position == sampler.resumed_at or ended:
        return None
    raise ValueError(
        f"state_dict() cannot tell what your loop trained: the sampler has handed out {sampler.position} "
        f"of {sampler.epoch_size} ids, and a DataLoader with workers fetches batches ahead. Build the "
        "loader with data.loader(batch_size=..., num_workers=...) (it counts the batches it delivers), "
        "or call data.end_epoch() after the epoch's last batch, or pass "
        "state_dict(position=samples_trained_this_epoch); torchdata's StatefulDataLoader keeps the "
        "sampler's state in its own"
    )
