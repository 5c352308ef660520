"""Staging from shards: each shard read once, front to back, by one rank, which forwards what the
others hold.

A dataset kept in shards (tar, Parquet, Arrow: sources with a ``shard_index``) is expensive to
read at random: on a shared file system a sample costs the read of its shard. So instead of
every rank reading its own samples out of every shard, shard ``s`` is read by rank ``s mod M``
alone, in one sequential pass, and each sample goes to the rank that holds it in the plan, over
the exchange's wire format (headers, crc32 checked on arrival, pipelined rounds). One pass per
shard a rank reads: a rank keeps one shard's samples in memory at a time.

Collective over every rank; ranks whose store is already committed only read and forward. A
staging cut short leaves no committed state on the ranks it did not finish, and the next attempt
stages those again.
"""

from __future__ import annotations

import math
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
from reshuffle.store.checksum import DEFAULT
from reshuffle.store.collectives import agree, gather_errors
from reshuffle.store.packs import MAX_PACK_BYTES, PackWriter
from reshuffle.store.rank_store import RankStore
from reshuffle.store.stage import prepare_root, store_meta
from reshuffle.store.transfer import MIN_PEER_CHUNK, Rounds, exchange_streams
from reshuffle.store.verify import check_holdings
from reshuffle.store.wire import SampleStream


def stage_from_shards(
    root: str | Path, rank: int, source: SampleSource, planner: ShufflePlanner, epoch: int,
    staging: NDArray[np.bool_], *, dataset: dict[str, Any] | None = None, device: torch.device | None = None,
    group: dist.ProcessGroup | None = None, chunk_bytes: int = 64 << 20, max_pack_bytes: int = MAX_PACK_BYTES,
) -> tuple[RankStore | None, str]:  # fmt: skip
    """Stage ``epoch``'s holdings of the ranks marked in ``staging`` (the same on every rank),
    reading each shard of ``source`` once. Returns this rank's new store (None where it was not
    staging) and a line saying what it read and staged."""
    started, world = time.perf_counter(), planner.world_size
    root = Path(root)
    holder = np.empty(planner.num_samples, dtype=np.int64)
    for r in range(world):
        holder[planner.plan(epoch).holdings(r)] = r
    shards = np.asarray(source.shard_index, dtype=np.int64)  # type: ignore[attr-defined]
    order = np.argsort(shards, kind="stable")  # ids shard by shard, ascending inside each
    bounds = np.searchsorted(shards[order], np.arange(int(shards.max()) + 2))
    members = [order[bounds[s] : bounds[s + 1]] for s in range(len(bounds) - 1)]
    store, writer, error = None, None, ""
    if staging[rank]:
        try:
            store, writer = _new_store(root, rank, source, planner, dataset, max_pack_bytes)
        except Exception as failure:
            error = f"{type(failure).__name__}: {failure}"
    agree(gather_errors(error, group), rank, "open their stores")
    rounds, read = Rounds(group, device or torch.device("cpu")), 0
    try:
        for index in range(math.ceil(len(members) / world)):
            shard = index * world + rank
            outgoing: dict[int, SampleStream] = {}
            try:
                if shard < len(members):
                    outgoing, count = _read(source, members[shard], holder, staging)
                    read += count
                error = ""
            except Exception as failure:
                error = f"{type(failure).__name__} reading shard {shard}: {failure}"
            agree(gather_errors(error, group), rank, "read their shards")
            receives = {}
            if writer is not None:
                for src in range(world):
                    theirs = index * world + src
                    if (
                        theirs < len(members)
                        and (mine := members[theirs][holder[members[theirs]] == rank]).size
                    ):
                        receives[src] = np.sort(mine)
            peer_chunk = max(MIN_PEER_CHUNK, chunk_bytes // world)
            exchange_streams(
                rounds, outgoing, receives, writer, source.num_classes, peer_chunk, world, device, group
            )
        if store is not None and writer is not None:
            store.commit_first(epoch, writer.close())
            writer = None
            check_holdings(store, planner)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    held = f"staged {len(store)} samples for epoch {epoch}; " if store is not None else ""
    return store, (
        f"rank {rank}: {held}read {read} samples of {len(range(rank, len(members), world))} shard(s) "
        f"once and forwarded them in {time.perf_counter() - started:.1f} s"
    )


def _new_store(
    root: Path, rank: int, source: SampleSource, planner: ShufflePlanner, dataset: dict[str, Any] | None,
    max_pack_bytes: int,
) -> tuple[RankStore, PackWriter]:  # fmt: skip
    meta = prepare_root(root, store_meta(source, planner, dataset))
    store = RankStore(root, rank, meta)
    store.lock = fmt.lock_directory(store.directory)
    store.pack_dir.mkdir(parents=True, exist_ok=True)
    store.remove_unreferenced()  # a staging that died half-way
    return store, store.pack_writer(max_pack_bytes)


def _read(
    source: SampleSource, ids: NDArray[np.int64], holder: NDArray[np.int64], staging: NDArray[np.bool_]
) -> tuple[dict[int, SampleStream], int]:
    """One shard's samples that staging ranks hold, read in shard order, as a stream per rank."""
    by_rank: dict[int, list[tuple[int, int, bytes]]] = {}
    count = 0
    for sample_id in ids.tolist():
        owner = int(holder[sample_id])
        if staging[owner]:
            by_rank.setdefault(owner, []).append(
                (sample_id, int(source.targets[sample_id]), source.raw(sample_id))
            )
            count += 1
    return {dst: SampleStream(sorted(samples), DEFAULT) for dst, samples in by_rank.items()}, count
