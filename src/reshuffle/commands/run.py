"""``reshuffle run CONFIG [key=value ...]``: train one experiment.

Examples::

    reshuffle run configs/smoke.yaml --nproc 2
    reshuffle run configs/fashion-mnist.yaml --nproc 4 shuffle.strategy=local shuffle.partition=label-sorted
    reshuffle run configs/fashion-mnist.yaml --nproc 4 --resume        # continue from the last checkpoint
    reshuffle run configs/fashion-mnist.yaml --virtual-ranks 256       # 256 DDP ranks in one process
    torchrun --nproc-per-node 4 -m reshuffle run configs/fashion-mnist.yaml

Results go to ``<log.dir>/<name>/``.
"""

from __future__ import annotations

import argparse

from reshuffle.config import load_run_config


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run", help="train with DDP under a shuffling strategy", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("config", help="run config (YAML); configs/ has examples")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="override config keys, e.g. train.epochs=5"
    )
    parser.add_argument(
        "--nproc", type=int, help="local ranks to start (default: dist.nproc); ignored under torchrun"
    )
    parser.add_argument(
        "--virtual-ranks",
        type=int,
        metavar="M",
        help="train as M DDP ranks in this one process (dist.virtual_ranks; exact DDP semantics)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    parser.add_argument(
        "--system",
        help="system config (datasets, backend); default: $RESHUFFLE_SYSTEM or configs/system.yaml",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from reshuffle.train.launch import launch

    overrides = list(args.overrides)
    if args.virtual_ranks is not None:
        overrides.append(f"dist.virtual_ranks={args.virtual_ranks}")
    config = load_run_config(args.config, overrides)
    return launch(config, args.system, nproc=args.nproc, resume=args.resume)
