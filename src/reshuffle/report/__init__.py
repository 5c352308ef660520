"""Reports that compare runs: plots (PNG), a summary table, and one ``report.md``.

A report reads only what runs write: ``config.yaml`` (to name each run's strategy and seed) and
``metrics/epochs.csv`` (:mod:`reshuffle.report.runs`); figures in :mod:`reshuffle.report.figures`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from reshuffle.report.figures import draw
from reshuffle.report.runs import (
    Group,
    ReportError,
    Run,
    differences,
    group_runs,
    label_runs,
    load_run,
    summary_rows,
)
from reshuffle.report.table import format_table

__all__ = [
    "Group",
    "ReportError",
    "Run",
    "differences",
    "group_runs",
    "label_runs",
    "load_run",
    "summary_rows",
    "write_report",
]


def write_report(
    run_dirs: Sequence[Path], out_dir: Path, *, title: str = "Shuffling strategies compared"
) -> str:
    """Plots, ``summary.md`` and ``report.md`` in ``out_dir``; returns the printed table."""
    runs = [load_run(Path(d)) for d in run_dirs]
    if not runs:
        raise ReportError("no run folders given")
    groups = group_runs(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = draw(groups, out_dir)
    headers, rows = summary_rows(groups)
    table_md = format_table(headers, rows, markdown=True)
    (out_dir / "summary.md").write_text(table_md + "\n")
    lines = [
        f"# {title}",
        "",
        f"{len(runs)} runs in {len(groups)} groups (mean over seeds; bands span the lowest to the "
        "highest seed).",
        "",
        table_md,
        "",
        "*vs global*: final test accuracy minus that of `global` (of the same experiment, or with the same "
        "settings apart from shuffle.*), in percentage points. *moved*: bytes a "
        "rank sends per epoch in store mode (planned; index mode reads them instead). *storage*: the most "
        "a store-mode rank holds at once (its samples plus those arriving).",
        "",
    ]
    for caption, name in plots:
        lines += [f"## {caption}", "", f"![{caption}]({name})", ""]
    if settings := differences(runs):
        lines += ["## Settings of each experiment (where they differ)", "", *settings, ""]
    lines += ["## Runs", "", *(f"- `{run.path}` (seed {run.seed})" for run in runs), ""]
    (out_dir / "report.md").write_text("\n".join(lines))
    return format_table(headers, rows)
