"""``ShuffledData``: the public data path a training loop drives with ``set_epoch``.

One object, two modes behind the same calls:

* ``mode="index"``: every rank can read the whole dataset; nothing is staged or moved, the
  sampler yields the plan's ids for this rank (like ``DistributedSampler``);
* ``mode="store"``: each rank keeps its share in a node-local store (a directory of its own under
  ``store_dir``), staged once from the dataset; before each epoch the plan's samples move between
  ranks over ``torch.distributed`` in the background while the current epoch trains, and commit
  atomically at the epoch boundary. A crash at any point loses and duplicates nothing.

Both modes feed a rank the same samples in the same order::

    data = ShuffledData(my_dataset, "/local/ssd/store", strategy="partial", fraction=0.1,
                        partition="label-sorted", seed=0, epochs=epochs)
    loader = DataLoader(data.dataset, batch_size=64, sampler=data.sampler, num_workers=4)
    for epoch in range(start_epoch, epochs):
        data.set_epoch(epoch)   # commit the exchange that ran during the last epoch, start the next
        for batch in loader:
            ...
        torch.save({"data": data.state_dict(), ...}, path)  # every epoch: a store only moves forward
    data.close()

Any map-style dataset is a source (store mode serialises items without pickle: ``data.items``);
reshuffle's own sources are served as ``(transform(image), label, id)``, as ``reshuffle run`` trains.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from numpy.typing import ArrayLike
from torch.utils.data import Dataset

from reshuffle.data.dataset import KeyedAugmentation, SourceDataset
from reshuffle.data.items import DatasetSource, source_of
from reshuffle.data.source import SampleSource
from reshuffle.data.transforms import Transform
from reshuffle.heartbeat import Watch, names_lost_ranks
from reshuffle.loader import DeliveredLoader, trained_position
from reshuffle.losses import LossTracker
from reshuffle.plan import EpochPlan, ShufflePlanner
from reshuffle.plan.partitions import PARTITIONS
from reshuffle.sampler import ShuffleSampler, rank_and_world
from reshuffle.store.collectives import collective_device
from reshuffle.store.dataset import StoreDataset, StoreItems
from reshuffle.store.exchange import ExchangeStats
from reshuffle.store.rank_store import RankStore
from reshuffle.store.session import StoreSession

log = logging.getLogger("reshuffle")

MODES = ("index", "store")


class ShuffledData:
    """One rank's data under a shuffling strategy: ``dataset`` + ``sampler`` for a ``DataLoader``.

    Args:
        dataset: any map-style dataset (``__len__``, ``__getitem__``), or a reshuffle sample
            source (then ``transform`` is required and items are ``(image, label, id)``).
        store_dir: the store directory (store mode): each rank writes ``rank-NNNNN/`` below it.
            Node-local storage; the ranks of a node may share one directory.
        mode: ``"store"`` (the default when ``store_dir`` is given) or ``"index"``.
        strategy, fraction, partition, seed, drop_last, **options: the plan, as for
            :class:`~reshuffle.plan.ShufflePlanner`.
        labels: one integer class per sample. Default: ``dataset.targets`` (or ``.labels``);
            needed by the label partitions, and stored with each sample in store mode.
        epochs: how many epochs the job trains, when known: no exchange runs after the last.
        rank, world_size: this rank and the number of ranks; default: ``group``'s, or the
            default process group's (or 0 and 1 without ``torch.distributed``).
        group: the process group the exchange runs on. It runs collectives from a background
            thread while training runs its own: pass a group reserved for it, never the group
            your gradients are all-reduced on. Default: a new group of all ranks. Per-sample losses
            (loss-driven strategies) are summed over the default process group.
        transform: for a reshuffle sample source, the pipeline from uint8 image to model input.
        track_losses: collect per-sample losses (:meth:`record_losses`) even if the strategy
            does not use them.
        chunk_mb: at most this many MiB leave a rank per exchange round.
        timeout_s: a peer that does not answer within this ends an exchange with an error.
        dataset_id: what the store records as the dataset (a name, or a mapping of whatever
            identifies it); a store reopens only for the same identity, size, world size and plan.
        on_exchange_phase: called with each phase an exchange reaches (progress, fault tests).

    Every rank must call :meth:`set_epoch`, :meth:`end_epoch`, :meth:`close` and, with a
    loss-driven strategy, :meth:`state_dict` at the same points: they may be collectives.
    """

    STATE_MODE = "mode"
    STATE_SAMPLER = "sampler"
    STATE_LOSSES = "losses"
    STATE_ENDED = "ended"  # end_epoch ran for the saved epoch (its losses are in the plan state)
    STATE_STORE_DIR = "store_dir"  # store mode: the stores' directory, absolute

    def __init__(
        self,
        dataset: Any,
        store_dir: str | Path | None = None,
        *,
        mode: str | None = None,
        strategy: str = "global",
        fraction: float = 0.0,
        partition: str = "random",
        labels: ArrayLike | None = None,
        seed: int = 0,
        drop_last: bool = False,
        epochs: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        group: dist.ProcessGroup | None = None,
        transform: Transform | None = None,
        track_losses: bool = False,
        chunk_mb: float = 64.0,
        timeout_s: float = 300.0,
        dataset_id: str | Mapping[str, Any] | None = None,
        on_exchange_phase: Callable[[str], None] | None = None,
        **options: Any,
    ) -> None:
        self.mode = _mode(mode, store_dir)
        self.rank, self.world_size = rank_and_world(rank, world_size, group)
        self.epochs = epochs
        self.seed = seed
        self.group = group
        needs_labels = partition in PARTITIONS and PARTITIONS[partition].requires_labels
        name = dataset_id if isinstance(dataset_id, str) else None
        self.source = source_of(
            dataset, labels, name, transform, read_labels=needs_labels or self.mode == "store"
        )
        self._planner: ShufflePlanner | None = None  # None: fewer samples than ranks, index mode
        if self.mode == "index" and len(self.source) < self.world_size:
            # as ShuffleSampler and DistributedSampler: pad by repeating, or with no sample yield
            # nothing (a strategy or partition other than the defaults is refused, by name)
            self.sampler = ShuffleSampler(self.source, self.world_size, self.rank, True, seed, drop_last,
                                          strategy=strategy, fraction=fraction, partition=partition,
                                          **options)  # fmt: skip
        else:
            self._planner = ShufflePlanner(
                len(self.source),
                self.world_size,
                strategy=strategy,
                fraction=fraction,
                partition=partition,
                labels=getattr(self.source, "targets", None),
                seed=seed,
                drop_last=drop_last,
                **options,
            )
            self.sampler = ShuffleSampler.from_planner(self._planner, self.rank)
        uses_losses = self._planner is not None and self._planner.strategy.uses_losses
        self.tracker = LossTracker(len(self.source)) if uses_losses or track_losses else None
        self.device = collective_device(group)
        self.store_dir = Path(store_dir) if store_dir is not None else None
        self.dataset: Dataset = self._dataset(dataset, transform)
        self.session: StoreSession | None = None  # store mode's store and exchanges
        if self.mode == "store":
            assert self.store_dir is not None  # _mode() refuses store mode without one
            identity = (
                dict(dataset_id)
                if isinstance(dataset_id, Mapping)
                else {"name": self.source.name, "split": self.source.split}
            )
            self.session = StoreSession(
                self.store_dir, self.rank, self.source, self.planner, dataset=identity, group=group,
                device=self.device, chunk_bytes=int(chunk_mb * 2**20), timeout_s=timeout_s,
                on_phase=on_exchange_phase,
            )  # fmt: skip
        # beats into the launcher's store, so an error a lost or hung peer caused names that rank
        self.watch = Watch(timeout_s)
        self.epoch: int | None = None  # the epoch set_epoch selected last
        self.plan: EpochPlan | None = None  # that epoch's plan, computed once
        self.last_exchange: ExchangeStats | None = None  # the exchange the last end_epoch finished
        self._ended: int | None = None  # the epoch end_epoch ran for
        self._loader: DeliveredLoader | None = None  # the loader loader() made: it counts delivered batches

    def loader(self, batch_size: int | None = 1, **options: Any) -> DeliveredLoader:
        """A ``DataLoader`` over this rank's data (``dataset`` and ``sampler`` set) that counts the
        batches it delivers to your loop, so that :meth:`state_dict` taken inside the loop is exact
        whatever ``num_workers``, ``prefetch_factor`` or ``persistent_workers``. ``options`` are
        DataLoader's; ``sampler``, ``batch_sampler`` and ``shuffle`` are set here."""
        self._loader = DeliveredLoader(self.dataset, self.sampler, batch_size, **options)
        return self._loader

    @property
    def planner(self) -> ShufflePlanner:
        """The plan of every epoch (:class:`~reshuffle.plan.ShufflePlanner`)."""
        if self._planner is None:
            raise ValueError(
                f"no planner: {len(self.source)} samples for {self.world_size} ranks are dealt as "
                "DistributedSampler deals them (padded), without a plan; data.sampler holds the order"
            )
        return self._planner

    @property
    def store(self) -> RankStore | None:
        """This rank's store (store mode, once the first :meth:`set_epoch` opened it)."""
        return self.session.store if self.session is not None else None

    def _dataset(self, dataset: Any, transform: Transform | None) -> Dataset:
        if isinstance(self.source, SampleSource) and not isinstance(self.source, DatasetSource):
            assert transform is not None  # source_of() asks for one for reshuffle's own sources
            if self.mode == "index":
                return SourceDataset(self.source, transform)
            return StoreDataset(None, self.source.decoder, transform)
        return dataset if self.mode == "index" else StoreItems(None, self.source.decoder)

    # ----------------------------------------------------------------- the epoch boundary

    @names_lost_ranks
    def set_epoch(self, epoch: int) -> None:
        """Select ``epoch``: finish and commit the exchange into it (store mode), start the next
        exchange in the background, and point the sampler at ``epoch``'s order. Collective in
        store mode. The first call stages this rank's share (or reopens and recovers it)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        epoch = int(epoch)
        if self.session is not None:
            self._move_store_to(epoch)
        elif self.epoch is not None and epoch != self.epoch:
            self.end_epoch()
        if self.tracker is not None and epoch != self.epoch:
            self.tracker.reset()  # the ended epoch's losses were handed over; a new epoch starts empty
        self.epoch = epoch
        self.plan = self._planner.plan(epoch) if self._planner is not None else None
        self.sampler.set_epoch(epoch)
        if isinstance(self.dataset, KeyedAugmentation):  # reshuffle's own: augmentation keyed by epoch
            self.dataset.set_epoch(epoch, seed=self.seed)
        if isinstance(self.dataset, (StoreDataset, StoreItems)):  # reads announced batches ahead
            self.dataset.follow(self.sampler.indices())
        if (
            self.session is not None
            and self._ended != epoch
            and self._exchanges_after(epoch)
            and not self.planner.strategy.needs_losses_of(epoch)  # deferred to end_epoch: needs the losses
        ):
            assert self.plan is not None  # store mode always has a planner
            self.session.start(epoch, self.plan)

    @names_lost_ranks
    def end_epoch(self) -> ExchangeStats | None:
        """Finish the current epoch's data work: reduce the recorded losses and hand them to the
        strategy, then (store mode) wait until every rank has prepared the next epoch's samples.
        :meth:`set_epoch` calls it when the loop has not; call it yourself to time the exchange's
        exposed part, or to checkpoint after every rank prepared and before the commit."""
        if self.epoch is None:
            raise RuntimeError("end_epoch() before set_epoch(); call set_epoch(epoch) first")
        if self._ended == self.epoch:
            return self.last_exchange
        if self.tracker is not None:
            if self.world_size > 1:
                self.tracker.reduce(device=self.device)
            if self._planner is not None and self._planner.strategy.uses_losses:
                self.planner.observe(self.epoch, *(t.numpy() for t in self.tracker.mean()))
        self.last_exchange = None
        if self.session is not None and self._exchanges_after(self.epoch):
            assert self.plan is not None
            self.last_exchange = self.session.finish(self.epoch, self.plan)
        self._ended = self.epoch
        return self.last_exchange

    def record_losses(self, ids: torch.Tensor, losses: torch.Tensor) -> None:
        """Per-sample losses of this rank's batch (for ``importance`` and ``select=importance``);
        ignored unless the strategy uses losses or ``track_losses`` is set."""
        if self.tracker is not None:
            self.tracker.add(ids, losses.detach())

    def losses(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(ids, mean loss)`` of every sample seen in the last ended epoch, over all ranks."""
        return self.tracker.mean() if self.tracker is not None else None

    def _exchanges_after(self, epoch: int) -> bool:
        return self.epochs is None or epoch + 1 < self.epochs

    def _move_store_to(self, epoch: int) -> None:
        """Store mode's side of ``set_epoch``: open the stores at the first call (or after a
        load); at the next epoch commit the exchange that ran during this one; catch up a jump."""
        assert self.session is not None
        if not self.session.synchronized:
            self.session.open(epoch)
            self.dataset.store = self.session.store  # type: ignore[attr-defined]
            if self._ended != epoch:
                self._ended = None
            return
        if epoch == self.epoch:
            return
        self.session.check_forward(epoch)
        assert self.epoch is not None
        if self._exchanges_after(self.epoch) and epoch == self.epoch + 1:
            self.end_epoch()
            self.session.commit(reserve_next=self._exchanges_after(epoch))
        else:
            self.session.abandon()
        self._ended = None
        if self.store is not None and self.store.epoch != epoch:
            self.session.catch_up(epoch)

    # ----------------------------------------------------------------- state

    @names_lost_ranks
    def state_dict(self, position: int | None = None) -> dict[str, Any]:
        """Where the data stands: epoch, position in it, plan state (and, mid-epoch with a
        loss-driven strategy, the losses recorded so far, summed over ranks: a collective).

        Args:
            position: samples of the current epoch this rank has trained on. Default: what the
                loader made by :meth:`loader` delivered; before the epoch's first batch, or after
                :meth:`end_epoch`, the sampler's position. With another loader, pass it (a
                prefetching DataLoader runs ahead of training): without it the state is refused
                rather than lose samples.

        Save it at least once per epoch in store mode, after the epoch's last step: a store
        only moves forward, so a job resumes from a checkpoint of the stores' epoch or the one
        before it.
        """
        if self.session is not None:  # no state describes an epoch that met a damaged sample
            self.session.check_damage()
        if position is None:
            position = trained_position(self._loader, self.sampler, ended=self._ended == self.epoch)
        sampler = self.sampler.state_dict()
        if position is not None:
            sampler[ShuffleSampler.STATE_POSITION] = int(position)
        ended = self.epoch is not None and self._ended == self.epoch
        state: dict[str, Any] = {
            self.STATE_MODE: self.mode,
            self.STATE_SAMPLER: sampler,
            self.STATE_ENDED: ended,
        }
        if self.session is not None:  # where a resized job finds the stores
            state[self.STATE_STORE_DIR] = str(self.session.root.resolve())
        if self.tracker is not None and not ended:
            if self.world_size > 1:
                state[self.STATE_LOSSES] = self.tracker.summed(device=self.device)
            else:
                state[self.STATE_LOSSES] = self.tracker.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` (of any mode: the plan is the same). The next
        :meth:`set_epoch` of the saved epoch continues at the saved position; of the next epoch,
        starts it. In store mode that call also recovers the stores (collective). A state saved at
        another world size loads too (elastic, see :mod:`reshuffle.plan.resize`); in store mode only at
        an epoch boundary, into a new ``store_dir`` that the next set_epoch fills from the old
        stores through the exchange (:mod:`reshuffle.store.resize`)."""
        sampler = state[self.STATE_SAMPLER]
        if self.session is not None:
            self.session.load(sampler[ShuffleSampler.STATE_CONFIG], sampler[ShuffleSampler.STATE_PLANNER],
                              int(sampler[ShuffleSampler.STATE_POSITION]), bool(state.get(self.STATE_ENDED)),
                              state.get(self.STATE_STORE_DIR))  # fmt: skip
        self.sampler.load_state_dict(sampler)
        if self.tracker is not None:
            self.tracker.reset()
            if state.get(self.STATE_LOSSES) is not None and self.rank == 0:  # summed: counted once
                self.tracker.load_state_dict(state[self.STATE_LOSSES])
        self.epoch = int(state[self.STATE_SAMPLER][ShuffleSampler.STATE_EPOCH])
        self._ended = self.epoch if state.get(self.STATE_ENDED) else None

    def close(self) -> None:
        """Wait for an exchange in flight (a restart decides its fate) and the store's upkeep;
        no collective."""
        if self.session is not None:
            self.session.close()
        self.watch.release()

    def __enter__(self) -> ShuffledData:  # with ShuffledData(...) as data: ... closes it
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        """Close; when the body failed because a peer rank died or hung (your DDP step's
        ``Connection closed by peer``, a timed-out collective), raise a ``PeerError`` that names that
        rank, from the original error. A failed body does not wait for an exchange in flight: the
        next start decides its fate."""
        if error is None:
            self.close()
            return
        named = self.watch.named(error)
        self.watch.release()
        if named is not error:
            raise named from error


def _mode(mode: str | None, store_dir: str | Path | None) -> str:
    mode = mode if mode is not None else ("store" if store_dir is not None else "index")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "store" and store_dir is None:
        raise ValueError("mode='store' needs store_dir (a node-local directory for this rank's samples)")
    return mode
