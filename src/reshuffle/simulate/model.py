"""A cost model of one training epoch per worker under each shuffling strategy.

Pure arithmetic on a :class:`Workload` (data set, batch, step time, BatchNorm layers) and a
:class:`Cluster` (network, node-local storage, shared file system, exchange implementation).
Every figure is per worker and per epoch; times in seconds, sizes in bytes.

What is modelled, and how:

* Compute: ``iterations = ceil(ceil(N / M) / batch)`` steps of ``iteration_s`` each (FW+BW, the
  gradient all-reduce and the update: what one step of global-shuffling training takes).
* ``global``: every worker needs the whole data set on node-local storage (the usual replica).
  When it does not fit, each worker reads its ``N/M`` samples per epoch from the shared file
  system, whose aggregate bandwidth all ``M`` workers share; reads are prefetched, so only the
  part longer than the epoch's compute is exposed.
* ``local``: ``N/M`` samples stored, nothing moves.
* ``partial``: ``k = round(Q * floor(N/M))`` samples leave and ``k`` arrive per epoch; storage
  peaks at ``(n + k)`` samples. The exchange for epoch ``e+1`` runs while epoch ``e`` trains, so
  it is hidden up to one epoch's compute. Its time depends on the implementation:

  - ``batched`` (reshuffle's exchanger): a fixed per-epoch cost (planning and the counts
    exchange), then payload rounds of at most ``chunk_bytes``, each an all-to-all that posts a
    message to every peer (``message_s`` each), plus bytes over the network and into the store;
  - ``per-sample`` (the style of the reference code of the IPDPS 2022 paper): an O(N) global
    plan each epoch (``reference_plan_s_per_sample * N``), then one message and one barrier
    (``2 ceil(log2 M)`` hops of ``latency_s``) per sample, each with ``per_sample_s`` of
    software overhead.

* ``importance`` (``interval`` epochs between re-partitions): like ``local`` between them; a
  re-partition moves about ``(1 - 1/M)`` of a worker's samples at an epoch boundary (it needs
  the last epoch's losses, so it is not overlapped), amortised over the interval; the per-sample
  losses are all-reduced once per epoch (``2 * 4 N`` bytes).
* Node-level plans (``node=True``, ``shuffle.level=node``; ``local`` and ``partial``): the
  strategy runs over nodes of ``node_workers`` workers, so ``partial`` moves
  ``k = round(Q * floor(N / nodes))`` samples per node across the network (``k / node_workers``
  per worker), and every epoch each node re-deals what it holds among its workers: about
  ``(R - 1) / R`` of a worker's samples move to another worker of its node, over the node's links
  (``intra_*``) and into that worker's store (per-rank stores write what arrives). Both are one
  exchange, hidden behind the epoch's compute; storage peaks at the holdings plus the arrivals.
* SyncBatchNorm (``sync_bn=True``): per step and per BatchNorm layer of ``C`` channels, PyTorch's
  SyncBatchNorm all-gathers ``2C + 1`` floats from every worker in the forward pass and
  all-reduces ``2C`` floats in the backward pass; both are on the critical path (never hidden).
  Latency-bound at scale: ``ceil(log2 M)`` hops per collective, and the all-gather grows with M.

Not modelled: contention between the exchange and the gradient all-reduce for the network, or
between the exchange and data loading for the node's CPUs; stragglers; failures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

FLOAT_BYTES = 4


@dataclass(frozen=True, kw_only=True)
class Workload:
    """A data set and a model's step on one worker."""

    name: str
    num_samples: int  # N
    sample_bytes: int  # S: stored bytes of one sample
    batch_size: int  # per worker
    iteration_s: float  # one training step at batch_size (FW+BW, gradient all-reduce, update)
    bn_channels: tuple[int, ...] = ()  # channels of each BatchNorm layer (SyncBatchNorm pricing)

    def __post_init__(self) -> None:
        for name in ("num_samples", "sample_bytes", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.iteration_s <= 0:
            raise ValueError(f"iteration_s must be positive, got {self.iteration_s}")


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """The machines: network, node-local storage, shared file system, exchange implementation."""

    name: str
    bandwidth_Bps: float  # network bytes/s per worker (its share of the node's injection bandwidth)
    latency_s: float  # one network hop (collective step, barrier hop)
    storage_bytes: float  # node-local storage available per worker
    pfs_Bps: float  # aggregate bandwidth of the shared file system, shared by all workers
    store_write_Bps: float  # node-local store: verify + write + fsync of arrivals, bytes/s
    message_s: float = 2e-6  # posting one message of an all-to-all (software, per peer)
    plan_s: float = 0.0  # batched: planning + counts exchange + commit, per epoch
    chunk_bytes: float = 64 * 2**20  # batched: payload bytes per round
    implementation: Literal["batched", "per-sample"] = "batched"
    per_sample_s: float = 1e-3  # per-sample: software cost of one message (pickle, Python, send)
    reference_plan_s_per_sample: float = 1e-6  # per-sample: O(N) plan per epoch, per sample of N
    node_workers: int = 8  # workers (GPUs) per node: they share its storage and its fast links
    intra_bandwidth_Bps: float = 100e9  # between workers of a node (NVLink, shared memory), per worker
    intra_latency_s: float = 5e-6  # one hop between workers of a node

    def __post_init__(self) -> None:
        for name in ("bandwidth_Bps", "pfs_Bps", "store_write_Bps", "chunk_bytes", "intra_bandwidth_Bps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.node_workers < 1:
            raise ValueError(f"node_workers must be at least 1, got {self.node_workers}")
        if self.implementation not in ("batched", "per-sample"):
            raise ValueError(f"implementation must be batched or per-sample, got {self.implementation!r}")

    def with_(self, **changes: Any) -> Cluster:
        return replace(self, **changes)


@dataclass(frozen=True)
class StrategySpec:
    """What a worker does: ``global``, ``local``, ``partial`` (fraction Q) or ``importance``
    (re-partition every ``interval`` epochs), optionally with SyncBatchNorm over all workers or
    over groups (``sync_group``: workers per group; ``"node"``: a node's workers)."""

    name: str
    fraction: float = 0.0
    interval: int = 10
    sync_bn: bool = False
    sync_group: int | str | None = None  # None: all workers
    node: bool = False  # a node-level plan (local and partial): the strategy over nodes, re-dealt within

    @property
    def label(self) -> str:
        base = f"{self.name}-{self.fraction:g}" if self.name == "partial" else self.name
        group = f":{self.sync_group}" if self.sync_group is not None else ""
        return base + ("+node" if self.node else "") + (f"+syncbn{group}" if self.sync_bn else "")


@dataclass(frozen=True)
class Prediction:
    """One worker's epoch under one strategy at one scale."""

    workers: int
    strategy: str
    fraction: float
    samples_per_worker: int
    iterations: int
    compute_s: float  # the epoch's steps
    storage_needed_bytes: float
    storage_available_bytes: float
    bytes_per_worker: float  # sent per epoch (exchange), or read from the shared file system
    remote_read_bytes: float  # of those, read from the shared file system
    exchange_s: float  # time of the epoch's exchange or remote reads
    hideable_s: float  # compute time available to hide it
    exposed_s: float  # what the epoch waits for
    syncbn_s: float  # SyncBatchNorm collectives on the critical path
    epoch_s: float
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.storage_needed_bytes <= self.storage_available_bytes

    @property
    def overlap_fails(self) -> bool:
        return self.exposed_s > 0.01 * self.compute_s


def hops(workers: int) -> int:
    return max(1, math.ceil(math.log2(workers))) if workers > 1 else 0


def allgather_s(cluster: Cluster, workers: int, bytes_each: float) -> float:
    """All-gather of ``bytes_each`` from every worker (recursive doubling / ring bandwidth term)."""
    if workers < 2:
        return 0.0
    return hops(workers) * cluster.latency_s + (workers - 1) * bytes_each / cluster.bandwidth_Bps


def allreduce_s(cluster: Cluster, workers: int, nbytes: float) -> float:
    """All-reduce of ``nbytes`` (tree latency, ring bandwidth)."""
    if workers < 2:
        return 0.0
    return (
        2 * hops(workers) * cluster.latency_s + 2 * (workers - 1) / workers * nbytes / cluster.bandwidth_Bps
    )


def syncbn_step_s(
    workload: Workload, cluster: Cluster, workers: int, group: int | str | None = None
) -> float:
    """SyncBatchNorm's collectives in one step: per layer, forward all-gather of ``2C + 1`` floats
    per worker (mean, inverse std, count) and backward all-reduce of ``2C`` floats, among the
    ``group`` workers that share statistics (all by default; ``"node"``: a node's). A group inside a
    node runs on the node's links (``intra_*``), a larger one on the network."""
    size = workers if group is None else cluster.node_workers if group == "node" else int(group)
    size = max(1, min(size, workers))
    link = cluster
    if size <= cluster.node_workers and cluster.node_workers % size == 0:  # groups never span nodes
        link = cluster.with_(bandwidth_Bps=cluster.intra_bandwidth_Bps, latency_s=cluster.intra_latency_s)
    return sum(
        allgather_s(link, size, (2 * c + 1) * FLOAT_BYTES) + allreduce_s(link, size, 2 * c * FLOAT_BYTES)
        for c in workload.bn_channels
    )


def exchange_s(cluster: Cluster, workers: int, samples: int, sample_bytes: int, num_samples: int) -> float:
    """Time for every worker to send ``samples`` samples and receive as many."""
    if workers < 2 or samples == 0:
        return 0.0
    nbytes = samples * sample_bytes
    if cluster.implementation == "batched":
        rounds = max(1, math.ceil(nbytes / cluster.chunk_bytes))
        posting = (1 + rounds) * (workers - 1) * cluster.message_s  # counts, then payload rounds
        return (
            cluster.plan_s
            + posting
            + (1 + rounds) * hops(workers) * cluster.latency_s
            + nbytes / cluster.bandwidth_Bps
            + nbytes / cluster.store_write_Bps
        )
    barrier = 2 * hops(workers) * cluster.latency_s
    per_sample = cluster.per_sample_s + barrier + sample_bytes / cluster.bandwidth_Bps
    per_sample += sample_bytes / cluster.store_write_Bps
    return cluster.reference_plan_s_per_sample * num_samples + samples * per_sample


def predict(workload: Workload, cluster: Cluster, workers: int, strategy: StrategySpec) -> Prediction:
    """One worker's epoch under ``strategy`` with ``workers`` workers."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if not 0.0 <= strategy.fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {strategy.fraction}")
    n_total, size = workload.num_samples, workload.sample_bytes
    if workers > n_total:
        raise ValueError(f"{workers} workers for {n_total} samples: every worker needs at least one sample")
    per_worker = math.ceil(n_total / workers)
    iterations = math.ceil(per_worker / workload.batch_size)
    compute = iterations * workload.iteration_s
    syncbn = (
        iterations * syncbn_step_s(workload, cluster, workers, strategy.sync_group)
        if strategy.sync_bn
        else 0.0
    )
    moved = remote = work = exposed = 0.0
    storage = per_worker * size
    extra: dict[str, float] = {}
    if strategy.name == "global":
        storage = n_total * size  # a replica on every worker
        if storage > cluster.storage_bytes and workers > 1:
            remote = moved = per_worker * size
            work = n_total * size / cluster.pfs_Bps  # all workers share the file system
            exposed = max(0.0, work - compute)
    elif strategy.node:
        if strategy.name not in ("local", "partial"):
            raise ValueError(f"node-level plans are priced for local and partial, not {strategy.name!r}")
        return _node_level(workload, cluster, workers, strategy, compute, syncbn)
    elif strategy.name == "local":
        pass
    elif strategy.name == "partial":
        k = round(strategy.fraction * (n_total // workers)) if workers > 1 else 0
        storage = (per_worker + k) * size
        moved = k * size
        work = exchange_s(cluster, workers, k, size, n_total)
        exposed = max(0.0, work - compute)
        extra["samples_moved"] = k
    elif strategy.name == "importance":
        if strategy.interval < 1:
            raise ValueError(f"importance interval must be at least 1 epoch, got {strategy.interval}")
        k = round((1 - 1 / workers) * per_worker)
        storage = (per_worker + k) * size
        repartition = exchange_s(cluster, workers, k, size, n_total)
        losses = allreduce_s(cluster, workers, 2 * FLOAT_BYTES * n_total)
        moved = k * size / strategy.interval
        work = repartition / strategy.interval + losses
        exposed = work  # at the boundary: the re-partition needs the last epoch's losses
        extra["repartition_s"] = repartition
    else:
        raise ValueError(f"unknown strategy {strategy.name!r}; choose global, local, partial or importance")
    return Prediction(
        workers=workers,
        strategy=strategy.label,
        fraction=strategy.fraction,
        samples_per_worker=per_worker,
        iterations=iterations,
        compute_s=compute,
        storage_needed_bytes=float(storage),
        storage_available_bytes=float(cluster.storage_bytes),
        bytes_per_worker=float(moved),
        remote_read_bytes=float(remote),
        exchange_s=work,
        hideable_s=compute if strategy.name in ("global", "partial") else 0.0,
        exposed_s=exposed,
        syncbn_s=syncbn,
        epoch_s=compute + exposed + syncbn,
        extra=extra,
    )


def _node_level(
    workload: Workload, cluster: Cluster, workers: int, strategy: StrategySpec, compute: float, syncbn: float
) -> Prediction:
    """``local`` or ``partial`` planned over nodes (see the module docstring)."""
    size, per_worker = workload.sample_bytes, math.ceil(workload.num_samples / workers)
    per_node = max(1, min(cluster.node_workers, workers))
    nodes = max(1, workers // per_node)
    k_node = round(strategy.fraction * (workload.num_samples // nodes)) if nodes > 1 else 0
    across = math.ceil(k_node / per_node)  # per worker, over the network
    within = round((per_node - 1) / per_node * (per_worker - across))  # the re-deal, over the node's links
    node_links = cluster.with_(bandwidth_Bps=cluster.intra_bandwidth_Bps, latency_s=cluster.intra_latency_s)
    work = exchange_s(cluster, workers, across, size, workload.num_samples) + exchange_s(
        node_links, per_node, within, size, workload.num_samples
    )
    exposed = max(0.0, work - compute)
    return Prediction(
        workers=workers, strategy=strategy.label, fraction=strategy.fraction, samples_per_worker=per_worker,
        iterations=math.ceil(per_worker / workload.batch_size), compute_s=compute,
        storage_needed_bytes=float((per_worker + across + within) * size),
        storage_available_bytes=float(cluster.storage_bytes), bytes_per_worker=float(across * size),
        remote_read_bytes=0.0, exchange_s=work, hideable_s=compute, exposed_s=exposed, syncbn_s=syncbn,
        epoch_s=compute + exposed + syncbn,
        extra={"samples_moved": across, "within_node_bytes": within * size},
    )  # fmt: skip


def crossover(
    workload: Workload, cluster: Cluster, workers: list[int], moving: StrategySpec
) -> list[tuple[int, float, float]]:
    """Per scale: (workers, extra seconds per epoch of ``moving`` over ``local``, extra seconds of
    ``local`` + SyncBatchNorm over ``local``): the two ways to train well on non-IID partitions."""
    rows = []
    for m in workers:
        base = predict(workload, cluster, m, StrategySpec("local")).epoch_s
        move = predict(workload, cluster, m, moving).epoch_s - base
        sync = predict(workload, cluster, m, StrategySpec("local", sync_bn=True)).epoch_s - base
        rows.append((m, move, sync))
    return rows


FIXES = (
    StrategySpec("partial", 0.01), StrategySpec("partial", 0.1), StrategySpec("local", sync_bn=True),
    StrategySpec("local", sync_bn=True, sync_group="node"), StrategySpec("partial", 0.1, node=True),
    StrategySpec("local", sync_bn=True, sync_group="node", node=True),
)  # fmt: skip


def cheapest_fix(
    workload: Workload, cluster: Cluster, workers: int, fixes: tuple[StrategySpec, ...] = FIXES,
    budget: float = 0.05,
) -> tuple[StrategySpec, float] | None:  # fmt: skip
    """The fix for non-IID partitions that costs least over ``local`` at ``workers`` workers, with
    its extra seconds per epoch, if that stays within ``budget`` of the epoch's compute; None if
    none does."""
    base = predict(workload, cluster, workers, StrategySpec("local"))
    costs = sorted(
        (
            (predict(workload, cluster, workers, fix).epoch_s - base.epoch_s, index)
            for index, fix in enumerate(fixes)
        ),
    )
    extra, index = costs[0]
    return (fixes[index], extra) if extra <= budget * base.compute_s else None
