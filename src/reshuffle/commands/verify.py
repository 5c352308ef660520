"""``reshuffle verify STORE_DIR``: is every sample in the rank stores exactly once, intact?

Checks every rank's manifest, index, packs and checksums, that the ranks are at one epoch, and
that together they hold each sample of the dataset exactly once (and, for strategies that do
not follow observed losses, exactly as the store's plan says).
Prints each problem by name; exit status 0 only when all is well, 1 otherwise.
"""

from __future__ import annotations

import argparse

from reshuffle.store import verify_store


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify", help="check a store directory: every sample once, intact", description=__doc__
    )
    parser.add_argument("store_dir", help="the store directory (shuffle.store_dir of the run)")
    parser.add_argument(
        "--no-checksums", action="store_true", help="skip reading every sample (structure only)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    problems = verify_store(args.store_dir, checksums=not args.no_checksums)
    for problem in problems:
        print(f"problem: {problem}")
    if problems:
        print(f"{args.store_dir}: {len(problems)} problem(s)")
        return 1
    checked = "checksums not read (--no-checksums)" if args.no_checksums else "checksums intact"
    print(f"{args.store_dir}: ok (every sample held exactly once, {checked})")
    return 0
