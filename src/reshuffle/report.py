"""Reports that compare runs: plots (PNG), a summary table, and one ``report.md``.

A report reads only what runs write: ``config.yaml`` (to name each run's strategy and seed) and
``metrics/epochs.csv``. Runs that differ only in ``seed`` form one group; each plot shows the
group's mean over seeds with a band from its lowest to its highest seed. Labels name the settings
that differ between groups (strategy first), e.g. ``partial 0.1`` or ``local, norm=group``.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reshuffle.config.loading import load_yaml_text
from reshuffle.errors import ReshuffleError
from reshuffle.text_table import format_table

NEEDED = ("epoch", "train_loss", "test_acc", "epoch_s")
IGNORED = {"seed", "name", "log", "dist.timeout_s", "train.max_steps", "train.workers", "data.test_limit"}
SHORT = {
    "shuffle.strategy": "",
    "shuffle.fraction": "",
    "shuffle.partition": "partition",
    "shuffle.select": "select",
    "model.norm": "norm",
    "train.bn_recalibrate": "recalibrate",
    "dist.virtual_ranks": "ranks",
    "shuffle.mode": "mode",
}


class ReportError(ReshuffleError):
    """A run folder the report cannot use; the message names the file and what is wrong."""


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # flattened: "shuffle.strategy" -> value
    epochs: list[dict[str, float]]

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))


def load_run(path: Path) -> Run:
    """A run folder's config and epoch metrics, or a ReportError naming what is missing or bad."""
    path = Path(path)
    config_path, metrics_path = path / "config.yaml", path / "metrics" / "epochs.csv"
    for needed in (config_path, metrics_path):
        if not needed.is_file():
            raise ReportError(f"{needed} is missing: is {path} a finished `reshuffle run` folder?")
    try:
        config = _flatten(load_yaml_text(config_path.read_text()))
    except Exception as error:
        raise ReportError(f"{config_path} cannot be read ({error})") from None
    with open(metrics_path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in NEEDED if c not in (reader.fieldnames or [])]
        if missing:
            raise ReportError(
                f"{metrics_path} lacks the column(s) {', '.join(missing)}: not a reshuffle metrics file"
            )
        epochs = []
        for line, row in enumerate(reader, start=2):
            try:
                epochs.append({k: float(v) if v not in ("", None) else math.nan for k, v in row.items() if k})
            except ValueError as error:
                raise ReportError(f"{metrics_path} line {line}: {error}") from None
    if not epochs:
        raise ReportError(f"{metrics_path} has no epochs yet: let the run finish at least one")
    return Run(path, config, epochs)


def _flatten(mapping: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(mapping, dict):
        raise ValueError("not a mapping")
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value and key != "optimizer_kwargs":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def label_runs(runs: Sequence[Run]) -> list[str]:
    """A short label per run from the settings that differ between runs (seed aside)."""
    keys = sorted({k for run in runs for k in run.config})
    varying = [
        k
        for k in keys
        if not any(k == i or k.startswith(f"{i}.") for i in IGNORED)
        and len({repr(run.config.get(k)) for run in runs}) > 1
    ]
    order = [k for k in SHORT if k in varying] + [k for k in varying if k not in SHORT]
    labels = []
    for run in runs:
        strategy = str(run.config.get("shuffle.strategy", "?"))
        if run.config.get("shuffle.strategy") == "partial":
            strategy += f" {run.config.get('shuffle.fraction')}"
        parts = [strategy]
        for key in order:
            if key in ("shuffle.strategy", "shuffle.fraction"):
                continue
            name = SHORT.get(key, key)
            parts.append(f"{name}={run.config.get(key)}")
        labels.append(", ".join(parts))
    return labels


@dataclass
class Group:
    label: str
    runs: list[Run]

    def series(self, column: str) -> tuple[list[int], list[float], list[float], list[float]]:
        """Epochs, and per epoch the mean, min and max over seeds of ``column`` (NaN skipped)."""
        epochs = sorted({int(row["epoch"]) for run in self.runs for row in run.epochs})
        means, lows, highs = [], [], []
        for epoch in epochs:
            values = [
                row.get(column, math.nan)
                for run in self.runs
                for row in run.epochs
                if int(row["epoch"]) == epoch and not math.isnan(row.get(column, math.nan))
            ]
            means.append(statistics.fmean(values) if values else math.nan)
            lows.append(min(values) if values else math.nan)
            highs.append(max(values) if values else math.nan)
        return epochs, means, lows, highs

    def per_run(self, column: str, pick: str = "last") -> list[float]:
        values = []
        for run in self.runs:
            column_values = [row.get(column, math.nan) for row in run.epochs]
            finite = [v for v in column_values if not math.isnan(v)]
            if pick == "boundaries":  # what moves between epochs: nothing after the last one
                finite = finite[:-1]
            if not finite:
                continue
            picks = {"last": finite[-1], "max": max(finite)}
            values.append(picks[pick] if pick in picks else statistics.fmean(finite))
        return values


def group_runs(runs: Sequence[Run]) -> list[Group]:
    groups: dict[str, Group] = {}
    for run, label in zip(runs, label_runs(runs), strict=True):
        groups.setdefault(label, Group(label, [])).runs.append(run)
    return list(groups.values())


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summary_rows(groups: Sequence[Group]) -> tuple[list[str], list[list[object]]]:
    """The summary table: accuracy (mean +- std over seeds), difference from global, costs."""
    baseline = next((g for g in groups if g.label.split(",")[0].strip() == "global"), None)
    base_final = _mean_std(baseline.per_run("test_acc"))[0] if baseline else math.nan
    headers = [
        "strategy", "seeds", "final test acc", "best test acc", "vs global (pp)", "epoch s",
        "moved MB/rank/epoch", "storage MB/rank",
    ]  # fmt: skip
    rows = []
    for group in groups:
        final, final_std = _mean_std(group.per_run("test_acc"))
        best, best_std = _mean_std(group.per_run("test_acc", "max"))
        world = group.runs[0].epochs[0].get("world_size", 1) or 1
        moved = [
            v / world / 1e6 for v in group.per_run("bytes_planned", "boundaries") if not math.isnan(v)
        ]  # planned = what store mode moves, at each epoch boundary
        storage = [v / 1e6 for v in group.per_run("storage_bytes", "max")]
        rows.append([
            group.label,
            len(group.runs),
            f"{final:.4f} +- {final_std:.4f}",
            f"{best:.4f} +- {best_std:.4f}",
            f"{100 * (final - base_final):+.2f}" if not math.isnan(base_final) else "-",
            round(statistics.fmean(group.per_run("epoch_s", "mean")), 2),
            round(statistics.fmean(moved), 3) if moved else "-",
            round(max(storage), 2) if storage else "-",
        ])  # fmt: skip
    return headers, rows


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
    plots = _plots(groups, out_dir)
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
        "*vs global*: final test accuracy minus that of `global`, in percentage points. *moved*: bytes a "
        "rank sends per epoch in store mode (planned; index mode reads them instead). *storage*: the most "
        "a store-mode rank holds at once (its samples plus those arriving).",
        "",
    ]
    for caption, name in plots:
        lines += [f"## {caption}", "", f"![{caption}]({name})", ""]
    lines += ["## Runs", "", *(f"- `{run.path}` (seed {run.seed})" for run in runs), ""]
    (out_dir / "report.md").write_text("\n".join(lines))
    return format_table(headers, rows)


def _plots(groups: Sequence[Group], out_dir: Path) -> list[tuple[str, str]]:
    """Every comparison figure, written into ``out_dir``; returns (title, file name) pairs."""
    figures = _Figures(groups, out_dir)
    figures.lines("test_acc", "test top-1 accuracy", "Test accuracy", "test_acc.png")
    figures.lines("train_loss", "train loss", "Train loss", "train_loss.png")
    figures.lines(
        "label_js", "Jensen-Shannon distance to the dataset's label mix", "Per-rank label skew "
        "(solid: mean over ranks, dashed: worst rank)", "label_js.png", extra="label_js_max",
    )  # fmt: skip
    figures.lines("churn", "share of a rank's samples new this epoch", "Churn", "churn.png")
    figures.lines("coverage", "share of the dataset a rank has trained on", "Coverage", "coverage.png")
    figures.bytes_moved()
    figures.time_breakdown()
    return figures.made


class _Figures:
    """matplotlib (Agg) figures over the same groups, one color per group throughout."""

    def __init__(self, groups: Sequence[Group], out_dir: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt, self.groups, self.out_dir = plt, groups, out_dir
        self.colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        self.crowded = len(groups) > 5  # a legend inside the axes would hide curves: put it on the right
        self.made: list[tuple[str, str]] = []

    def color(self, index: int) -> str:
        return self.colors[index % len(self.colors)]

    def new_figure(self) -> tuple[Any, Any]:
        return self.plt.subplots(figsize=(10.5 if self.crowded else 7.5, 4.5))

    def by_epoch(self, axes: Any, xlabel: str, ylabel: str, title: str) -> None:
        from matplotlib.ticker import MaxNLocator

        axes.set_xlabel(xlabel)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(ylabel)
        axes.set_title(title)
        axes.grid(alpha=0.3)
        if self.crowded:
            axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        else:
            axes.legend(fontsize=8, loc="best")

    def save(self, figure: Any, title: str, name: str) -> None:
        figure.tight_layout()
        figure.savefig(self.out_dir / name, dpi=110)
        self.plt.close(figure)
        self.made.append((title, name))

    def lines(self, column: str, ylabel: str, title: str, name: str, *, extra: str | None = None) -> None:
        """One curve per group (mean over its runs, the runs' range shaded); ``extra`` dashed."""
        figure, axes = self.new_figure()
        for index, group in enumerate(self.groups):
            epochs, mean, low, high = group.series(column)
            axes.plot(epochs, mean, marker="o", markersize=3, color=self.color(index), label=group.label)
            if len(group.runs) > 1:
                axes.fill_between(epochs, low, high, color=self.color(index), alpha=0.15, linewidth=0)
            if extra:
                epochs, mean, _, _ = group.series(extra)
                axes.plot(epochs, mean, linestyle="--", color=self.color(index), linewidth=1)
        self.by_epoch(axes, "epoch", ylabel, title)
        self.save(figure, title, name)

    def bytes_moved(self) -> None:
        title = "Data moved per rank per epoch (store mode)"
        figure, axes = self.new_figure()
        for index, group in enumerate(self.groups):
            world = group.runs[0].epochs[0].get("world_size", 1) or 1
            epochs, mean, _, _ = group.series("bytes_planned")
            axes.plot(epochs, [m / world / 1e6 for m in mean], marker="o", markersize=3,
                      color=self.color(index), label=group.label)  # fmt: skip
        self.by_epoch(axes, "epoch (data moved after it)", "MB sent per rank", title)
        self.save(figure, title, "bytes.png")

    def time_breakdown(self) -> None:
        parts = [("io_s", "I/O wait"), ("exchange_exposed_s", "exposed exchange"), ("fw_bw_s", "FW+BW"),
                 ("ge_wu_s", "GE+WU")]  # fmt: skip
        groups = self.groups
        figure, axes = self.plt.subplots(figsize=(7.5, 4.5))
        bottoms = [0.0] * len(groups)
        for column, name in parts:
            heights = []
            for group in groups:
                values = group.per_run(column, "mean")
                heights.append(statistics.fmean(values) if values else 0.0)
            axes.bar(range(len(groups)), heights, bottom=bottoms, label=name)
            bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
        if not any(bottoms):
            axes.text(0.5, 0.5, "not measured (virtual ranks run in one process)", transform=axes.transAxes,
                      ha="center", va="center")  # fmt: skip
        axes.set_ylim(bottom=0)
        axes.set_xticks(range(len(groups)), [g.label for g in groups], rotation=20, ha="right", fontsize=8)
        axes.set_ylabel("seconds per epoch (mean over ranks)")
        axes.set_title("Epoch time breakdown (empty for virtual ranks)")
        axes.legend(fontsize=8)
        axes.grid(alpha=0.3, axis="y")
        self.save(figure, "Epoch time breakdown", "time_breakdown.png")
