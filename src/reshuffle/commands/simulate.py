"""``reshuffle simulate``: predict storage, data movement and epoch time per strategy at any scale.

Examples::

    reshuffle simulate --preset imagenet --workers 16 256 1024 2048 \\
        --strategies global local partial:0.1 --batch-size 32 --csv out.csv
    reshuffle simulate --preset imagenet --workers 256 1024 2048 4096 \\
        --strategies partial:0.1 local+syncbn local+syncbn:node --implementation batched per-sample \\
        --plot epoch.png
    reshuffle simulate --calibrate bench/recorded/this-machine.json --workers 2 \\
        --strategies global partial:0.1

A strategy is ``global``, ``local``, ``partial:Q``, ``importance[:INTERVAL]``, each optionally
with ``+syncbn`` (SyncBatchNorm's collectives priced on every step), ``+syncbn:node`` (among a
node's workers, on its links) or ``+syncbn:G`` (groups of G workers). Per worker and epoch it
reports: storage needed vs available, bytes exchanged or read from the shared file system,
iterations, the exchange time against the compute that can hide it, the exposed time, SyncBatchNorm
time and the epoch time; and, from the real planner, rank 0's churn, coverage and mixing. Then, per
scale, whether moving data (partial) or SyncBatchNorm costs less, and the cheapest fix that stays
within 5% of compute. The model and its assumptions:
``reshuffle.simulate.model``; docs/simulate.md.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import replace
from pathlib import Path

from reshuffle.config import ConfigError
from reshuffle.report.table import format_table
from reshuffle.simulate.model import FIXES, Prediction, StrategySpec, cheapest_fix, crossover, predict
from reshuffle.simulate.presets import CLUSTERS, DEFAULT_CLUSTER, WORKLOADS, calibrated, load_record
from reshuffle.simulate.quality import Quality, planner_quality

CSV_COLUMNS = (
    "workers",
    "strategy",
    "fraction",
    "implementation",
    "samples_per_worker",
    "iterations",
    "compute_s",
    "exchange_s",
    "hideable_s",
    "exposed_s",
    "syncbn_s",
    "epoch_s",
    "bytes_per_worker",
    "remote_read_bytes",
    "storage_per_worker_bytes",
    "storage_available_bytes",
    "fits",
    "churn",
    "coverage",
    "mixing_bits",
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate", help="predict storage, data moved and epoch time per strategy, to thousands of workers",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(WORKLOADS), default="imagenet", help="workload preset")
    source.add_argument("--calibrate", metavar="RECORD", help="workload and cluster from a benchmark record")
    parser.add_argument("--cluster", choices=sorted(CLUSTERS), help="cluster preset (default: the preset's)")
    parser.add_argument("--workers", type=int, nargs="+", required=True, metavar="M")
    parser.add_argument(
        "--strategies", nargs="+", default=["global", "local", "partial:0.1"], metavar="STRATEGY",
        help="global local partial:Q importance[:INTERVAL], each optionally +syncbn",
    )  # fmt: skip
    parser.add_argument(
        "--implementation", nargs="+", choices=("batched", "per-sample"), default=["batched", "per-sample"],
        help="exchange implementation(s): batched (reshuffle), per-sample (reference style); default both",
    )  # fmt: skip
    workload = parser.add_argument_group("workload (override the preset)")
    workload.add_argument("--num-samples", type=int, help="N")
    workload.add_argument("--sample-bytes", type=int, help="stored bytes per sample")
    workload.add_argument("--batch-size", type=int, help="per-worker batch")
    workload.add_argument("--iteration-s", type=float, help="seconds per training step at that batch")
    cluster = parser.add_argument_group("cluster (override the preset)")
    cluster.add_argument("--bandwidth-gbs", type=float, help="network GB/s per worker")
    cluster.add_argument("--latency-us", type=float, help="one network hop, microseconds")
    cluster.add_argument("--storage-gb", type=float, help="node-local storage per worker, GB")
    cluster.add_argument("--pfs-gbs", type=float, help="shared file system aggregate GB/s")
    cluster.add_argument("--store-write-gbs", type=float, help="node-local store write GB/s (with fsync)")
    cluster.add_argument("--per-sample-ms", type=float, help="per-sample exchange: software ms per sample")
    cluster.add_argument("--node-workers", type=int, help="workers (GPUs) per node")
    cluster.add_argument("--intra-gbs", type=float, help="GB/s per worker between the workers of a node")
    cluster.add_argument("--intra-latency-us", type=float, help="one hop inside a node, microseconds")
    parser.add_argument(
        "--quality-epochs",
        type=int,
        default=3,
        help="epochs of the real planner for churn/coverage (0: skip)",
    )
    parser.add_argument("--csv", metavar="FILE", help="write every prediction as CSV")
    parser.add_argument("--plot", metavar="FILE", help="PNG: epoch time vs workers per strategy")
    parser.set_defaults(run=run)


def parse_strategy(spec: str) -> StrategySpec:
    """``partial:0.1+syncbn`` -> StrategySpec("partial", 0.1, sync_bn=True); ``local+syncbn:node`` ->
    SyncBatchNorm among a node's workers."""
    head, *flags = spec.split("+")
    node = "node" in flags
    flags = [f for f in flags if f != "node"]
    unknown = [f for f in flags if f.partition(":")[0] != "syncbn"]
    if unknown:
        raise ConfigError(
            f"--strategies: unknown suffix +{unknown[0]} in {spec!r}; the suffixes are +node (a node-level "
            "plan) and +syncbn (or +syncbn:node, +syncbn:G for groups of G workers)"
        )
    group: int | str | None = flags[0].partition(":")[2] or None if flags else None
    if group not in (None, "node"):
        if not str(group).isdigit() or int(group) < 1:
            raise ConfigError(f"--strategies: +syncbn:{group} in {spec!r}: a group is node or a worker count")
        group = int(group)
    name, _, value = head.partition(":")
    if name not in ("global", "local", "partial", "importance"):
        raise ConfigError(
            f"--strategies: unknown strategy {name!r}; choose global, local, partial:Q, importance"
        )
    sync_bn = bool(flags)
    if node and name not in ("local", "partial"):
        raise ConfigError(
            f"--strategies: +node in {spec!r}: node-level plans are local+node and partial:Q+node"
        )
    try:
        if name == "partial":
            if not value:
                raise ConfigError(f"--strategies: {spec!r} needs a fraction, e.g. partial:0.1")
            fraction = float(value)
            if not 0.0 <= fraction <= 1.0:
                raise ConfigError(f"--strategies: fraction {fraction} in {spec!r} is outside [0, 1]")
            return StrategySpec("partial", fraction, sync_bn=sync_bn, sync_group=group, node=node)
        if name == "importance":
            interval = int(value) if value else 10
            return StrategySpec("importance", interval=interval, sync_bn=sync_bn, sync_group=group)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(f"--strategies: {spec!r}: {error}") from None
    if value:
        raise ConfigError(f"--strategies: {name} takes no value ({spec!r})")
    return StrategySpec(name, sync_bn=sync_bn, sync_group=group, node=node)


def _setup(args: argparse.Namespace):
    if args.calibrate:
        workload, cluster = calibrated(load_record(args.calibrate))
        if args.cluster:
            cluster = CLUSTERS[args.cluster]
    else:
        workload = WORKLOADS[args.preset]
        cluster = CLUSTERS[args.cluster or DEFAULT_CLUSTER[args.preset]]
    workload = replace(
        workload,
        **{
            key: value
            for key, value in (
                ("num_samples", args.num_samples),
                ("sample_bytes", args.sample_bytes),
                ("batch_size", args.batch_size),
                ("iteration_s", args.iteration_s),
            )
            if value is not None
        },
    )
    scaled = (
        ("bandwidth_Bps", args.bandwidth_gbs, 1e9),
        ("latency_s", args.latency_us, 1e-6),
        ("storage_bytes", args.storage_gb, 1e9),
        ("pfs_Bps", args.pfs_gbs, 1e9),
        ("store_write_Bps", args.store_write_gbs, 1e9),
        ("per_sample_s", args.per_sample_ms, 1e-3),
        ("intra_bandwidth_Bps", args.intra_gbs, 1e9),
        ("intra_latency_s", args.intra_latency_us, 1e-6),
    )
    cluster = replace(cluster, **{key: value * unit for key, value, unit in scaled if value is not None})
    if args.node_workers is not None:
        cluster = replace(cluster, node_workers=args.node_workers)
    return workload, cluster


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1000
    return f"{nbytes:.3g} TB"  # pragma: no cover


def run(args: argparse.Namespace) -> int:
    strategies = [parse_strategy(s) for s in args.strategies]
    if any(m < 1 for m in args.workers):
        raise ConfigError(f"--workers must all be at least 1, got {args.workers}")
    workload, cluster = _setup(args)
    rows: list[tuple[str, Prediction, Quality | None]] = []
    qualities: dict[tuple[int, str, float], Quality | None] = {}
    for implementation in args.implementation:
        for m in args.workers:
            for strategy in strategies:
                if implementation != args.implementation[0] and strategy.name not in (
                    "partial",
                    "importance",
                ):
                    continue  # only an exchange depends on the implementation
                prediction = predict(workload, cluster.with_(implementation=implementation), m, strategy)
                key = (m, strategy.name, strategy.fraction)
                if key not in qualities:
                    qualities[key] = planner_quality(
                        workload.num_samples, m, strategy.name, strategy.fraction, args.quality_epochs
                    )
                rows.append((implementation, prediction, qualities[key]))

    print(
        f"{workload.name}: N={workload.num_samples:,}, {_size(workload.sample_bytes)} per sample, batch "
        f"{workload.batch_size} per worker, {workload.iteration_s * 1e3:.4g} ms per step; cluster "
        f"{cluster.name}: {cluster.bandwidth_Bps / 1e9:.3g} GB/s and {cluster.latency_s * 1e6:.3g} us "
        "per hop, "
        f"{_size(cluster.storage_bytes)} local storage per worker, shared file system "
        f"{cluster.pfs_Bps / 1e9:.3g} GB/s in all"
    )
    headers = [
        "workers", "strategy", "impl", "samples", "iters", "compute s", "exchange s", "exposed s",
        "syncbn s", "epoch s", "moved/worker", "storage/worker", "fits", "churn",
        f"coverage@{args.quality_epochs}", "mixing bits",
    ]  # fmt: skip
    table = []
    for implementation, p, q in rows:
        moves = p.strategy.startswith(("partial", "importance"))
        table.append(
            [
                p.workers, p.strategy, implementation if moves else "-", p.samples_per_worker, p.iterations,
                round(p.compute_s, 4), round(p.exchange_s, 4), round(p.exposed_s, 4), round(p.syncbn_s, 4),
                round(p.epoch_s, 4), _size(p.bytes_per_worker), _size(p.storage_needed_bytes),
                "yes" if p.fits else "NO", None if q is None else round(q.churn, 4),
                None if q is None else round(q.coverage, 4), None if q is None else round(q.mixing_bits, 2),
            ]
        )  # fmt: skip
    print(format_table(headers, table))
    failing = sorted({(p.strategy, i, p.workers) for i, p, _ in rows if p.overlap_fails and p.hideable_s > 0})
    for name, implementation, m in failing:
        print(
            f"overlap fails: {name} ({implementation}) at {m} workers: the exchange outlasts the "
            "epoch's compute"
        )
    _print_crossover(workload, cluster, args, strategies)
    if args.csv:
        _write_csv(Path(args.csv), rows)
        print(f"csv: {args.csv}")
    if args.plot:
        _plot(Path(args.plot), rows, workload.name)
        print(f"plot: {args.plot}")
    return 0


def _print_crossover(workload, cluster, args, strategies) -> None:
    """Moving data vs SyncBatchNorm: two ways to train well on non-IID partitions."""
    if not workload.bn_channels:
        return
    moving = [s for s in strategies if s.name == "partial" and not s.sync_bn] or [
        StrategySpec("partial", 0.1)
    ]
    for strategy in moving[:1]:
        for implementation in args.implementation:
            points = crossover(workload, cluster.with_(implementation=implementation), args.workers, strategy)
            parts = [
                f"{m}: {'move' if move < sync else 'syncbn'} (+{move:.3g} s vs +{sync:.3g} s)"
                for m, move, sync in points
            ]
            print(
                f"cheaper fix per epoch, {strategy.label} ({implementation}) vs local+syncbn: "
                + "; ".join(parts)
            )
    chosen = []
    for m in args.workers:
        best = cheapest_fix(workload, cluster, m)
        base = predict(workload, cluster, m, StrategySpec("local")).compute_s
        chosen.append(
            f"{m}: {best[0].label} (+{best[1]:.3g} s, {100 * best[1] / base:.1f}%)" if best else f"{m}: none"
        )
    print(
        f"cheapest fix within 5% of compute (of {', '.join(fix.label for fix in FIXES)}; "
        f"{cluster.node_workers} workers per node): " + "; ".join(chosen)
    )


def _write_csv(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for implementation, p, q in rows:
            writer.writerow(
                [
                    p.workers, p.strategy, p.fraction, implementation, p.samples_per_worker, p.iterations,
                    p.compute_s, p.exchange_s, p.hideable_s, p.exposed_s, p.syncbn_s, p.epoch_s,
                    p.bytes_per_worker, p.remote_read_bytes, p.storage_needed_bytes,
                    p.storage_available_bytes,
                    int(p.fits), "" if q is None else q.churn, "" if q is None else q.coverage,
                    "" if q is None else q.mixing_bits,
                ]
            )  # fmt: skip


def _plot(path: Path, rows, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for implementation, p, _ in rows:
        label = p.strategy + (
            f" ({implementation})" if p.strategy.startswith(("partial", "importance")) else ""
        )
        series.setdefault(label, []).append((p.workers, p.epoch_s))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        points.sort()
        ax.plot([m for m, _ in points], [s for _, s in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("workers")
    ax.set_ylabel("predicted epoch time per worker (s)")
    ax.set_title(f"{title}: predicted epoch time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
