"""``StoreSession``: one rank's life in store mode, the part of ``ShuffledData`` that owns a store.

Open or stage the rank's store (from shards, each read once, where the source is sharded), or
build it from the stores of a job with another number of ranks (:mod:`reshuffle.store.resize`);
recover and catch up (:mod:`reshuffle.store.recovery`); then, epoch after epoch, start the next
exchange in the background, finish it, agree, and commit. ``ShuffledData`` decides *when* (the
epoch boundary its loop reaches); the session does *what* store mode does there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from reshuffle.data.source import SampleSource
from reshuffle.plan import EpochPlan, ShufflePlanner
from reshuffle.plan.resize import saved_planner
from reshuffle.store.collectives import agree, gather_errors, gather_ints, ranks_on_this_host
from reshuffle.store.exchange import Exchanger, ExchangeStats, new_exchange_group
from reshuffle.store.rank_store import RankStore
from reshuffle.store.recovery import synchronize
from reshuffle.store.resize import resize_stores
from reshuffle.store.shard_stage import stage_from_shards
from reshuffle.store.stage import committed_epoch, stage

log = logging.getLogger("reshuffle")


class StoreSession:
    """One rank's store and exchanger, opened at the first epoch a loop selects.

    Args:
        root: the store directory (this rank's store is ``rank-NNNNN/`` below it).
        rank: this rank.
        source: the dataset staged into the store.
        planner: the plan the stores follow.
        dataset: what the store records as the dataset's identity.
        group: the process group exchanges run on (default: a new group of all ranks).
        device: where collective tensors live (the rank's GPU under NCCL, else the CPU).
        chunk_bytes, timeout_s, on_phase: as for :class:`~reshuffle.store.Exchanger`.
    """

    def __init__(
        self,
        root: Path,
        rank: int,
        source: SampleSource,
        planner: ShufflePlanner,
        *,
        dataset: dict[str, Any],
        group: dist.ProcessGroup | None,
        device: torch.device,
        chunk_bytes: int,
        timeout_s: float,
        on_phase: Callable[[str], None] | None = None,
    ) -> None:
        self.root = root
        self.rank = rank
        self.source = source
        self.planner = planner
        self.dataset = dataset
        self.group = group
        self.device = device
        self.chunk_bytes = chunk_bytes
        self.timeout_s = timeout_s
        self.on_phase = on_phase
        self.store: RankStore | None = None
        self.exchanger: Exchanger | None = None
        self.synchronized = False  # the stores agreed and are at the epoch the loop selected
        self.resize_from: tuple[ShufflePlanner, Path] | None = None  # (old planner, old root)

    def load(self, config: dict[str, Any], planned: dict[str, Any], position: int, ended: bool,
             old_root: str | None) -> None:  # fmt: skip
        """A loaded state (the sampler's ``config``, ``planned`` state and ``position``): the next
        :meth:`open` recovers the stores to it; one of another world size, saved at an epoch
        boundary, fills new stores from the old ones at ``old_root`` through the exchange."""
        self.synchronized, self.resize_from = False, None
        world = self.planner.world_size
        if config.get("world_size") == world:
            return
        old = saved_planner(self.planner, config, planned)
        if not ended and 0 < position < old.samples_per_rank:
            raise ValueError(
                f"store mode resumes a state of {old.world_size} ranks with {world} only at an epoch "
                f"boundary (this one was saved mid-epoch): resume with {old.world_size} ranks to the "
                "epoch's end"
            )
        if old_root:  # an older state names none: staged from the source
            self.resize_from = (old, Path(old_root))

    @property
    def running(self) -> bool:
        return self.exchanger is not None and self.exchanger.running

    def open(self, epoch: int) -> None:
        """Stage (or reopen, or resize into) this rank's store, then agree with every rank on
        where the stores are and bring them to ``epoch`` (collective)."""
        self.abandon()  # a state was loaded mid-job: recovery decides the fate of an exchange in flight
        if self.store is None:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    "store mode exchanges samples over torch.distributed: call "
                    "torch.distributed.init_process_group first (one rank: init_process_group('gloo', "
                    "store=torch.distributed.HashStore(), rank=0, world_size=1)), or use mode='index'"
                )
            if self.resize_from is None:
                self.store, message = open_or_stage(
                    self.root, self.rank, self.source, self.planner, epoch, dataset=self.dataset,
                    device=self.device, group=self.group,
                )  # fmt: skip
            else:  # another number of ranks: the old stores re-partitioned through the exchange
                old_planner, old_root = self.resize_from
                self.store, message = resize_stores(
                    old_root, self.root, self.rank, self.source, old_planner, self.planner, epoch,
                    dataset=self.dataset, device=self.device, group=self.group, chunk_bytes=self.chunk_bytes,
                )  # fmt: skip
            log.info("%s", message)
            # the ranks of a host share its page cache: their stores together decide how they are read
            self.store.share_memory(ranks_on_this_host(self.device, self.group))
            self.exchanger = Exchanger(
                self.store, self.planner, group=self.group or new_exchange_group(self.timeout_s),
                device=self.device, chunk_bytes=self.chunk_bytes, timeout_s=self.timeout_s,
                on_phase=self.on_phase,
            )  # fmt: skip
        self.catch_up(epoch)
        self.synchronized = True

    def catch_up(self, epoch: int) -> None:
        """Recover and run the exchanges up to ``epoch`` (collective; exposed: nothing overlaps it)."""
        assert self.exchanger is not None
        for action in synchronize(self.exchanger, epoch):
            log.info("%s", action)

    def check_forward(self, epoch: int) -> None:
        """Refuse an epoch before the stores' own: a store only moves forward."""
        assert self.store is not None
        if epoch < self.store.epoch:
            raise ValueError(
                f"set_epoch({epoch}): the stores are at epoch {self.store.epoch} and cannot go back; "
                "a store only moves forward (resume from a checkpoint of a later epoch, or restage)"
            )

    def start(self, epoch: int, plan: EpochPlan) -> None:
        """Begin the exchange ``epoch -> epoch + 1`` in the background, unless one runs."""
        assert self.exchanger is not None
        if not self.exchanger.running:
            self.exchanger.start(epoch, plan)

    def finish(self, epoch: int, plan: EpochPlan) -> ExchangeStats:
        """Run (if it was deferred) and wait for the exchange out of ``epoch``, then agree that
        every rank prepared it (collective)."""
        assert self.exchanger is not None
        self.check_damage()
        self.start(epoch, plan)
        stats = self.exchanger.wait()
        self.exchanger.agree()
        return stats

    def check_damage(self) -> None:
        """Raise if a read of this rank's store found a damaged sample (in any process)."""
        if self.store is not None:
            self.store.check_damage()

    def commit(self, reserve_next: bool = True) -> None:
        """Every rank has prepared: commit the next epoch (collective); ``reserve_next``: another
        exchange follows it (space is allocated ahead for its arrivals)."""
        assert self.exchanger is not None
        self.exchanger.commit(reserve_next)

    def abandon(self) -> None:
        """Wait for an exchange the loop will not commit (a jump): recovery decides its fate."""
        if self.running:
            self.exchanger.wait()  # type: ignore[union-attr]

    def close(self) -> None:
        """Wait for an exchange in flight and for the upkeep; no collective."""
        if self.exchanger is not None:
            self.abandon()
            self.exchanger.settle()


def open_or_stage(
    root: str | Path, rank: int, source: SampleSource, planner: ShufflePlanner, target_epoch: int, *,
    dataset: dict[str, Any] | None = None, device: torch.device | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[RankStore, str]:  # fmt: skip
    """:func:`~reshuffle.store.stage.stage` on every rank (collective), agreed before and after.

    A rank whose store is missing (a new node, a new scratch directory) stages at the newest epoch
    any rank's store is at, so that recovery can bring it along (at ``target_epoch`` when no rank
    has a store). A sharded source is staged with each shard read once, by one rank, and forwarded
    (:mod:`reshuffle.store.shard_stage`). Then every rank learns whether every rank opened its
    store: a rank that failed raises its own error, the others a ``PeerError`` naming it, at once
    (not after a timeout in the next collective)."""
    epochs = gather_ints([committed_epoch(Path(root), rank)], device, group)[:, 0]
    existing = epochs[epochs >= 0]
    epoch = int(existing.max()) if existing.size else target_epoch
    store: RankStore | None = None
    if getattr(source, "shard_index", None) is not None and planner.world_size > 1 and (epochs < 0).any():
        store, message = stage_from_shards(
            root, rank, source, planner, epoch, epochs < 0, dataset=dataset, device=device, group=group
        )
    try:
        if store is None:  # not staged from shards (or this rank's store was already there)
            store, message = stage(root, rank, source, planner, epoch, dataset=dataset)
    except Exception as error:
        gather_errors(f"{type(error).__name__}: {error}", group)
        raise
    agree(gather_errors("", group), rank, "open their stores", "; nothing was changed here")
    return store, message
