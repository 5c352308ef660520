"""``reshuffle plan``: what a strategy does to the data, epoch by epoch, before any training.

Prints the shuffle-quality metrics of :mod:`reshuffle.plan.quality` per epoch, with the
analytic expectation next to each where one exists.

Example::

    reshuffle plan --labels-from fashion-mnist --world-size 8 --strategy partial --fraction 0.1 \\
        --partition label-sorted --epochs 5

With ``--ranks-per-node R`` a second table shows what each node (R consecutive ranks) holds;
``--level node`` plans at the node level (``shuffle.level=node``).
"""

from __future__ import annotations

import argparse

import numpy as np

from reshuffle.config import ConfigError
from reshuffle.plan import PARTITIONS, STRATEGIES, ShufflePlanner
from reshuffle.plan.quality import block_reads, measure, measure_nodes
from reshuffle.report.table import format_table

MAX_MEASURED_RANKS = 64


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="print per-epoch shuffle quality of a strategy (no training)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--num-samples", type=int, help="N (default: the size of --labels-from)")
    parser.add_argument("--world-size", type=int, required=True, help="M, the number of ranks")
    parser.add_argument("--strategy", default="global", choices=sorted(STRATEGIES))
    parser.add_argument("--fraction", type=float, help="Q for partial (required with it)")
    parser.add_argument("--partition", default="random", choices=sorted(PARTITIONS))
    parser.add_argument(
        "--labels-from",
        metavar="DATASET",
        help="take labels (and N) from a dataset's train split, e.g. fashion-mnist",
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drop-last", action="store_true")
    parser.add_argument(
        "--ranks", type=int, default=MAX_MEASURED_RANKS, help="measure at most this many ranks, evenly spaced"
    )
    parser.add_argument(
        "--block-size", type=int, default=256,
        help="ids per block (corgipile's blocks; the block_reads column for every strategy)",
    )  # fmt: skip
    parser.add_argument(
        "--buffer-blocks", type=int, default=8, help="blocks a reader keeps (corgipile's buffer; block_reads)"
    )
    parser.add_argument(
        "--ranks-per-node", type=int, default=1,
        help="R ranks share a node's storage: adds a per-node table (churn, label skew, moves across nodes)",
    )  # fmt: skip
    parser.add_argument(
        "--level", choices=["rank", "node"], default="rank",
        help="node: the strategy runs over nodes; each node deals its samples to its ranks afresh per epoch",
    )  # fmt: skip
    parser.add_argument("--system", help="system config file (dataset paths)")
    parser.set_defaults(run=run)


def _labels(args: argparse.Namespace) -> np.ndarray | None:
    if args.labels_from is None:
        return None
    from reshuffle.config import DataConfig, load_system_config
    from reshuffle.data import open_source

    source = open_source(DataConfig(name=args.labels_from), "train", load_system_config(args.system))
    labels = source.targets
    if args.num_samples is not None:
        if args.num_samples > labels.size:
            raise ValueError(
                f"--num-samples {args.num_samples} exceeds the {labels.size} samples of {args.labels_from}"
            )
        labels = labels[: args.num_samples]
    return labels


def run(args: argparse.Namespace) -> int:
    labels = _labels(args)
    num_samples = args.num_samples if labels is None else labels.size
    if num_samples is None:
        raise ValueError("give --num-samples N, or --labels-from DATASET to take N from a dataset")
    if labels is None and PARTITIONS[args.partition].requires_labels:
        raise ConfigError(
            f"--partition {args.partition} needs labels: add --labels-from DATASET (e.g. fashion-mnist)"
        )
    planner = ShufflePlanner(
        num_samples,
        args.world_size,
        strategy=args.strategy,
        fraction=_fraction(args),
        partition=args.partition,
        labels=labels,
        seed=args.seed,
        drop_last=args.drop_last,
        ranks_per_node=_ranks_per_node(args),
        **(
            {"block_size": args.block_size, "buffer_blocks": args.buffer_blocks}
            if args.strategy == "corgipile"
            else {}
        ),
    )
    if planner.strategy.uses_losses:
        raise ValueError(
            f"strategy {args.strategy!r} follows the per-sample losses of a training run, which "
            "`reshuffle plan` does not have; train it with `reshuffle run CONFIG "
            f"shuffle.strategy={args.strategy}` and read metrics/epochs.csv"
        )
    count = max(1, min(args.ranks, args.world_size))
    ranks = sorted({int(r) for r in np.linspace(0, args.world_size - 1, count).round()})
    plan = planner.plan(0)
    moved = sum(ids.size for ids in plan.sends(0).values())
    print(
        f"N={num_samples} M={args.world_size} strategy={args.strategy} fraction={planner.fraction} "
        f"partition={args.partition} seed={args.seed}\n"
        f"per rank: {plan.samples_per_rank} samples per epoch ({plan.num_padded} padded, "
        f"{plan.num_dropped} dropped in all), holds {planner.layout.max_size} at most, "
        f"rank 0 sends {moved} after epoch 0; measured {len(ranks)} of {args.world_size} ranks"
    )
    rows = [
        (
            q.epoch,
            q.churn,
            q.expected_churn,
            q.coverage,
            q.expected_coverage,
            q.label_distance,
            q.label_distance_max,
            q.order_entropy,
            q.order_entropy_max,
            *_reads(planner, q.epoch, ranks, args.block_size, args.buffer_blocks),
        )
        for q in measure(planner, args.epochs, ranks)
    ]
    headers = [
        "epoch",
        "churn",
        "(expected)",
        "coverage",
        "(expected)",
        "label_js",
        "label_js_max",
        "order_bits",
        "(max)",
        "block_reads",
        "(scan)",
    ]
    print(format_table(headers, rows))
    if args.ranks_per_node > 1:
        print(f"\nper node ({args.world_size // args.ranks_per_node} nodes of {args.ranks_per_node} ranks):")
        node_rows = [
            (q.epoch, q.churn, q.label_distance, q.label_distance_max, q.moved_across)
            for q in measure_nodes(planner, args.epochs, args.ranks_per_node)
        ]
        print(
            format_table(
                ["epoch", "node_churn", "node_label_js", "node_label_js_max", "moved_across"], node_rows
            )
        )
    return 0


def _ranks_per_node(args: argparse.Namespace) -> int:
    if args.ranks_per_node < 1 or args.world_size % args.ranks_per_node:
        raise ConfigError(
            f"--ranks-per-node {args.ranks_per_node} must divide --world-size {args.world_size}"
        )
    if args.level == "node" and args.ranks_per_node == 1:
        raise ConfigError("--level node needs --ranks-per-node R (R > 1 ranks share a node's storage)")
    return args.ranks_per_node if args.level == "node" else 1


def _reads(
    planner: ShufflePlanner, epoch: int, ranks: list[int], block: int, buffer: int
) -> tuple[float, float]:
    """Blocks a rank reads in ``epoch``'s order with a cache of ``buffer`` blocks (mean over
    ``ranks``), and what a sequential scan of its holdings reads: the I/O of data read in runs."""
    plan = planner.plan(epoch)
    reads = [block_reads(plan.indices(r), block, buffer) for r in ranks]
    scans = [np.unique(plan.holdings(r) // block).size for r in ranks]
    return round(float(np.mean(reads)), 1), round(float(np.mean(scans)), 1)


def _fraction(args: argparse.Namespace) -> float:
    """The same rule as ``compare`` and ``simulate``: partial needs its Q."""
    if args.strategy == "partial" and args.fraction is None:
        raise ConfigError("--strategy partial needs --fraction Q (e.g. --fraction 0.1)")
    return 0.0 if args.fraction is None else args.fraction
