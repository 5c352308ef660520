"""``reshuffle report RUN_DIR [RUN_DIR ...]``: plots and a summary table from finished runs.

Reads each run's ``config.yaml`` and ``metrics/epochs.csv`` only. Runs that differ only in seed
are averaged. Writes PNG plots, ``summary.md`` and ``report.md`` to ``--out`` (default: a
``report`` folder next to the first run) and prints the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="plots and a summary table from run folders", description=__doc__
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (<log.dir>/<name>)")
    parser.add_argument("--out", help="report folder (default: <parent of the first run>/report)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from reshuffle.report import write_report

    out = Path(args.out) if args.out else Path(args.run_dirs[0]).resolve().parent / "report"
    print(write_report([Path(d) for d in args.run_dirs], out))
    print(f"report: {out / 'report.md'}")
    return 0
