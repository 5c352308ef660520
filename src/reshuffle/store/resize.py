"""Elastic resume in store mode: M ranks' stores re-partitioned over M' ranks by the exchange.

A job that resumes at an epoch boundary with M' ranks instead of M (``reshuffle run --resume
--nproc M'``, or :class:`~reshuffle.ShuffledData` loading a state of another world size) builds
its M' stores in a new ``store_dir`` out of the M old ones, without reading the source again:

1. every new rank says which old stores it can see (a node-local ``store_dir`` holds the stores
   of the old ranks that ran on that node); each old store gets one owner among the new ranks
   that see it (old rank k goes to new rank k mod M' when that one sees it). An old store that no
   rank sees is an error that names it, before anything is written;
2. the owners agree on the epoch the old stores hold (their committed states, as they are: a state
   prepared for the next epoch is left alone, except where a commit was cut short, some stores
   at E + 1 and the others prepared for it, which is rolled forward as the M-rank job would);
3. in one pass per old store an owner holds, each owner streams every sample of that store to
   the new rank that holds it in the M'-rank plan of the resume epoch (itself included), with the
   exchange's wire format, checks and pipelined rounds; arrivals land in the new store's packs.
   Every sample moves (the old stores' epoch may be earlier than the resume epoch: a run extended
   with more epochs and another number of ranks);
4. each new store commits its first state and is checked against the plan.

The old stores are read, never changed except for finishing a cut-short commit: a crash at any
point leaves them as they were, and the next attempt redoes the transfer for the ranks whose new
store has no committed state yet. Remove the old ``store_dir`` once the resized
job has committed an epoch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from numpy.typing import NDArray

from reshuffle.data.source import SampleSource
from reshuffle.plan import ShufflePlanner
from reshuffle.store import format as fmt
from reshuffle.store.collectives import agree, gather_errors, gather_ints
from reshuffle.store.packs import MAX_PACK_BYTES, PackWriter
from reshuffle.store.rank_store import RankStore
from reshuffle.store.stage import committed_epoch, prepare_root, stage, store_meta
from reshuffle.store.transfer import MIN_PEER_CHUNK, Rounds, exchange_streams
from reshuffle.store.verify import check_holdings
from reshuffle.store.wire import OutgoingStream


def resize_stores(
    old_root: str | Path, new_root: str | Path, rank: int, source: SampleSource, old: ShufflePlanner,
    new: ShufflePlanner, epoch: int, *, dataset: dict[str, Any] | None = None,
    device: torch.device | None = None, group: dist.ProcessGroup | None = None,
    chunk_bytes: int = 64 << 20, max_pack_bytes: int = MAX_PACK_BYTES,
) -> tuple[RankStore, str]:  # fmt: skip
    """Rank ``rank``'s store of ``epoch`` under ``new_root`` (planned by ``new``: M' ranks),
    built from the stores of the ``old`` planner's M ranks under ``old_root``. Collective over
    every rank of the job; a rank that fails raises its own error, the others a ``PeerError``
    naming it. Returns the opened store and a line saying what happened."""
    old_root, new_root = Path(old_root), Path(new_root)
    if old_root.resolve() == new_root.resolve():
        raise fmt.StoreError(
            f"resuming {old.world_size} ranks' stores with {new.world_size} ranks needs a new store_dir: "
            f"{new_root} holds the old ones, which stay as they are until the new ones are complete"
        )
    started, world = time.perf_counter(), new.world_size
    done = gather_ints([int(committed_epoch(new_root, rank) >= 0)], device, group)[:, 0].astype(bool)
    if done.all():  # an earlier attempt finished: reopen
        return stage(new_root, rank, source, new, epoch, dataset=dataset)
    store, writer, owned = None, None, []
    try:
        owners = _owners(old_root, old.world_size, rank, world, device, group)
        owned = [_open_old(old_root, k, old, epoch) for k in owners[rank]]
        if not done[rank]:
            meta = prepare_root(new_root, store_meta(source, new, dataset))
            store = RankStore(new_root, rank, meta)
            store.lock = fmt.lock_directory(store.directory)
            store.pack_dir.mkdir(parents=True, exist_ok=True)
            store.remove_unreferenced()  # an earlier attempt that died half-way
        error = ""
    except Exception as failure:
        error = f"{type(failure).__name__}: {failure}"
    agree(gather_errors(error, group), rank, "open the stores", "; the old stores are unchanged")
    try:
        held_at = _agreed_epoch(owned, old, epoch, device, group)
        writer = store.pack_writer(max_pack_bytes) if store is not None else None
        _stream(owners, owned, old, new, (held_at, epoch), rank, ~done, writer, source.num_classes,
                chunk_bytes, device, group)  # fmt: skip
        if store is not None and writer is not None:
            store.commit_first(epoch, writer.close())
            writer = None
            check_holdings(store, new)
        error = ""
    except Exception as failure:
        if writer is not None:
            writer.abort()
        error = f"{type(failure).__name__}: {failure}"
    agree(gather_errors(error, group), rank, "resize the stores", "; the old stores are unchanged")
    if store is None:
        store, _ = stage(new_root, rank, source, new, epoch, dataset=dataset)
    size = int(store.records["length"].sum())
    return store, (
        f"rank {rank}: resized the stores of {old.world_size} ranks to {world}: {len(store)} samples "
        f"({size / 2**20:.1f} MiB) for epoch {epoch}, streamed from old store(s) {owners} "
        f"in {time.perf_counter() - started:.1f} s"
    )


def _owners(
    old_root: Path, old_world: int, rank: int, world: int, device: torch.device | None,
    group: dist.ProcessGroup | None,
) -> list[list[int]]:  # fmt: skip
    """Per new rank, the old stores it reads (collective): each old store goes to one new rank that
    sees it, new rank k mod M' first."""
    visible = [int((old_root / fmt.rank_dir_name(k) / fmt.MANIFEST).is_file()) for k in range(old_world)]
    table = gather_ints(visible, device, group).astype(bool)  # (new ranks, old ranks)
    owners: list[list[int]] = [[] for _ in range(world)]
    unseen = []
    for k in range(old_world):
        viewers = np.flatnonzero(table[:, k])
        if not viewers.size:
            unseen.append(k)
            continue
        owners[k % world if table[k % world, k] else int(viewers[0])].append(k)
    if unseen:
        raise fmt.StoreError(
            f"no rank of this job sees the old store(s) of rank(s) {unseen} under {old_root} (a node-local "
            "store_dir on a node that is gone?): run on the nodes that hold them, or stage afresh from the "
            "source (resume with a state saved in index mode, or start a new run)"
        )
    return owners


def _open_old(old_root: Path, old_rank: int, old: ShufflePlanner, epoch: int) -> RankStore:
    store = RankStore.open(old_root, old_rank)
    if store.meta.world_size != old.world_size or store.meta.num_samples != old.num_samples:
        raise fmt.StoreError(
            f"{old_root} holds stores of {store.meta.world_size} ranks and {store.meta.num_samples} samples; "
            f"the state resumed was saved by {old.world_size} ranks over {old.num_samples}"
        )
    store.lock = fmt.lock_directory(store.directory)  # no other job changes it while we read
    return store


def _agreed_epoch(
    owned: list[RankStore], old: ShufflePlanner, epoch: int, device: torch.device | None,
    group: dist.ProcessGroup | None,
) -> int:  # fmt: skip
    """The epoch every old store holds (collective), at most ``epoch``. Their committed states are
    read as they are; only where a commit was cut short (some stores at E + 1, the others prepared
    for it) the prepared states are committed, as the M-rank job's restart would have done."""
    committed, prepared = np.full(old.world_size, -1), np.full(old.world_size, -1)
    for store in owned:
        committed[store.rank] = store.epoch
        pending = store.prepared_epoch()
        prepared[store.rank] = -1 if pending is None else pending
    table = gather_ints([*committed.tolist(), *prepared.tolist()], device, group).max(axis=0)
    committed, prepared = table[: old.world_size], table[old.world_size :]
    top = int(committed.max())
    lagging = committed != top
    if lagging.any() and not np.all(prepared[lagging] == top):
        shown = ", ".join(f"rank {k}: {committed[k]}" for k in range(old.world_size))
        raise fmt.StoreError(
            f"the old stores are at different epochs ({shown}) and cannot be rolled forward: resume with "
            f"{old.world_size} ranks first, then change the number of ranks"
        )
    if top > epoch:
        raise fmt.StoreError(
            f"the old stores are at epoch {top}, past the epoch {epoch} the job resumes at; resume from a "
            "newer checkpoint"
        )
    for store in owned:
        if store.epoch != top:
            store.commit()
        check_holdings(store, old)
    return top


def _stream(
    owners: list[list[int]], owned: list[RankStore], old: ShufflePlanner, new: ShufflePlanner,
    epochs: tuple[int, int], rank: int, receiving: NDArray[np.bool_], writer: PackWriter | None,
    num_classes: int, chunk_bytes: int, device: torch.device | None, group: dist.ProcessGroup | None,
) -> None:  # fmt: skip
    """Every old store's samples to the new ranks that hold them (collective): one pass per old
    store an owner holds, each pass one pipelined exchange in which every owner streams one store.
    ``epochs``: the old stores' epoch and the new ones'."""
    held_at, epoch = epochs
    world = new.world_size
    holder = np.empty(new.num_samples, dtype=np.int64)
    for r in range(world):
        holder[new.plan(epoch).holdings(r)] = r
    rounds = Rounds(group, device or torch.device("cpu"))
    peer_chunk = max(MIN_PEER_CHUNK, chunk_bytes // world)
    for index in range(max(len(stores) for stores in owners)):
        mine = owned[index] if index < len(owned) else None
        sends = {} if mine is None else _split(mine.ids, holder, receiving)
        receives = {}
        if writer is not None:
            for src, stores in enumerate(owners):
                if index < len(stores):
                    ids = old.plan(held_at).holdings(stores[index])
                    if (arriving := ids[holder[ids] == rank]).size:
                        receives[src] = arriving
        outgoing = {dst: OutgoingStream(mine, ids) for dst, ids in sends.items()} if mine is not None else {}
        exchange_streams(rounds, outgoing, receives, writer, num_classes, peer_chunk, world, device, group)


def _split(ids: NDArray[np.int64], holder: NDArray[np.int64], receiving: NDArray[np.bool_]) -> dict:
    """``ids`` (sorted) by the new rank that holds them, for the ranks still receiving."""
    return {int(dst): ids[holder[ids] == dst] for dst in np.unique(holder[ids]).tolist() if receiving[dst]}
