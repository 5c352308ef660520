"""``reshuffle verify STORE_DIR [STORE_DIR ...]``: is every sample in the rank stores exactly once, intact?

Checks every rank's manifest, index, packs and checksums, that the ranks are at one epoch, and
that together they hold each sample of the dataset exactly once (and, for strategies that do
not follow observed losses, exactly as the store's plan says).
A job whose rank folders live on several nodes: give every node's store directory (mounted or
copied) to check it whole, or run ``verify --node STORE_DIR`` on each node to check its share.
Prints each problem by name. Exit status: 0 when all is well; 3 when the only findings are an
exchange in flight (a job stopped between an exchange's prepare and its commit: the next start
finishes it or rolls it back, nothing is damaged); 1 for anything else (damage).
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify", help="check a store directory: every sample once, intact", description=__doc__
    )
    parser.add_argument(
        "store_dir", nargs="+", help="the store directory (shuffle.store_dir of the run); one per node for a "
        "job whose stores live on several nodes",
    )  # fmt: skip
    parser.add_argument(
        "--node", action="store_true", help="check only the ranks present (one node's share; no union check)"
    )
    parser.add_argument(
        "--no-checksums", action="store_true", help="skip reading every sample (structure only)"
    )
    parser.set_defaults(run=run)


EXIT_DAMAGED = 1
EXIT_IN_FLIGHT = 3


def run(args: argparse.Namespace) -> int:
    # torch: imported when a store is checked, not for --help
    from reshuffle.store.verify import damage, verify_store

    problems = verify_store(*args.store_dir, checksums=not args.no_checksums, node=args.node)
    where = " ".join(args.store_dir)
    damaged = damage(problems)
    for problem in problems:
        print(f"{'problem' if problem in damaged else 'in flight'}: {problem}")
    if damaged:
        print(f"{where}: {len(damaged)} problem(s)")
        return EXIT_DAMAGED
    if problems:
        print(
            f"{where}: an exchange is in flight (the job stopped before its commit); the next start of the "
            "job finishes it or rolls it back. Nothing is damaged."
        )
        return EXIT_IN_FLIGHT
    checked = "checksums not read (--no-checksums)" if args.no_checksums else "checksums intact"
    if args.node:
        print(f"{where}: ok (this node's ranks: files whole, {checked}; the union over ranks is not checked)")
    else:
        print(f"{where}: ok (every sample held exactly once, {checked})")
    return 0
