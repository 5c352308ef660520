"""``reshuffle report RUN_DIR [RUN_DIR ...]``: plots and a summary table from finished runs.

Reads each run's ``config.yaml`` and ``metrics/epochs.csv`` only. Runs that differ only in seed
are averaged. A ``reshuffle compare`` folder (``<log.dir>/<name>``, holding ``runs/``) stands for
all its runs. Writes PNG plots, ``summary.md`` and ``report.md`` to ``--out`` (default: the
compare folder's ``report``, else a ``report`` folder next to the first run) and prints the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="plots and a summary table from run folders", description=__doc__
    )
    parser.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="run folders, or compare folders holding runs/"
    )
    parser.add_argument(
        "--out", help="report folder (default: <compare folder or parent of first run>/report)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from reshuffle.report import write_report

    run_dirs: list[Path] = []
    default_out = None
    for given in map(Path, args.run_dirs):
        if not (given / "config.yaml").exists() and (given / "runs").is_dir():
            run_dirs += sorted(p for p in (given / "runs").iterdir() if (p / "config.yaml").is_file())
            default_out = default_out or given / "report"
        else:
            run_dirs.append(given)
            default_out = default_out or given.resolve().parent / "report"
    out = Path(args.out) if args.out else default_out
    assert out is not None  # argparse gives at least one run folder
    print(write_report(run_dirs, out))
    print(f"report: {out / 'report.md'}")
    return 0
