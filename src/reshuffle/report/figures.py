"""The report's figures (matplotlib, Agg): one color per group of runs throughout."""

from __future__ import annotations

import math
import statistics
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from reshuffle.report.runs import Group


def draw(groups: Sequence[Group], out_dir: Path) -> list[tuple[str, str]]:
    """Every comparison figure, written into ``out_dir``; returns (title, file name) pairs."""
    figures = Figures(groups, out_dir)
    figures.lines("test_acc", "test top-1 accuracy", "Test accuracy", "test_acc.png")
    figures.lines("train_loss", "train loss", "Train loss", "train_loss.png")
    figures.lines(
        "label_js", "Jensen-Shannon distance to the dataset's label mix", "Per-rank label skew "
        "(solid: mean over ranks, dashed: worst rank)", "label_js.png", extra="label_js_max", share=True,
    )  # fmt: skip
    figures.lines("churn", "share of a rank's samples new this epoch", "Churn", "churn.png", share=True)
    figures.lines(
        "coverage", "share of the dataset a rank has trained on", "Coverage", "coverage.png", share=True
    )
    figures.bytes_moved()
    figures.frontier()
    figures.time_breakdown()
    return figures.made


def moved_points(group: Group) -> list[tuple[int, float]]:
    """(epoch, MB sent per rank after it) for every epoch but the run's last, after which nothing
    moves."""
    world = group.runs[0].epochs[0].get("world_size", 1) or 1
    last = int(group.runs[0].config.get("train.epochs", 0)) - 1
    epochs, means, _, _ = group.series("bytes_planned")
    return [
        (e, m / world / 1e6) for e, m in zip(epochs, means, strict=True) if e < last and not math.isnan(m)
    ]


def frontier_points(
    groups: Sequence[Group], column: str = "bytes_across_nodes"
) -> list[tuple[int, float, list[float]]]:
    """(group index, MB of ``column`` per rank per epoch, final test accuracies) of every group
    whose runs record both (``bytes_across_nodes``: sent to other nodes of ``dist.ranks_per_node``
    ranks; ``bytes_planned``: sent to any other rank)."""
    points = []
    for index, group in enumerate(groups):
        world = group.runs[0].epochs[0].get("world_size", 1) or 1
        moved, accuracies = group.per_run(column, "boundaries"), group.per_run("test_acc")
        if moved and accuracies:
            points.append((index, statistics.fmean(moved) / world / 1e6, accuracies))
    return points


def frontier_basis(groups: Sequence[Group]) -> tuple[str, list[tuple[int, float, list[float]]]]:
    """What the frontier's x axis counts: data sent across nodes when any run sent some, else
    (every run on one node, or nodes not set) data sent to other ranks."""
    across = frontier_points(groups)
    if any(moved > 0 for _, moved, _ in across):
        return "bytes_across_nodes", across
    return "bytes_planned", frontier_points(groups, "bytes_planned")


def pareto(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (cost, value) points no other point beats in both (lower cost, higher value), by cost."""
    front: list[tuple[float, float]] = []
    for cost, value in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or value > front[-1][1]:
            front.append((cost, value))
    return front


class Figures:
    """matplotlib (Agg) figures over the same groups, one color per group throughout."""

    def __init__(self, groups: Sequence[Group], out_dir: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt, self.groups, self.out_dir = plt, groups, out_dir
        self.colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        self.crowded = len(groups) > 3  # a legend inside the axes would hide curves: put it on the right
        self.made: list[tuple[str, str]] = []

    def color(self, index: int) -> str:
        return self.colors[index % len(self.colors)]

    def new_figure(self) -> tuple[Any, Any]:
        return self.plt.subplots(figsize=(10.5 if self.crowded else 7.5, 4.5))

    def by_epoch(self, axes: Any, xlabel: str, ylabel: str, title: str, handles: Sequence[Any] = ()) -> None:
        from matplotlib.ticker import MaxNLocator

        axes.set_xlabel(xlabel)
        last = max(int(row["epoch"]) for group in self.groups for run in group.runs for row in run.epochs)
        axes.set_xlim(-0.3, max(last, 1) + 0.3)  # every epoch on the axis, even where one point shows
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(ylabel)
        axes.set_title(title)
        axes.grid(alpha=0.3)
        shown = [*axes.get_legend_handles_labels()[0], *handles]
        for handle in shown:  # a long label wraps instead of running off the figure
            handle.set_label(textwrap.fill(handle.get_label(), 44))
        if self.crowded:
            axes.legend(handles=shown, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                        borderaxespad=0.0)  # fmt: skip
        else:
            axes.legend(handles=shown, fontsize=8, loc="best")

    def save(self, figure: Any, title: str, name: str) -> None:
        figure.tight_layout()
        figure.savefig(self.out_dir / name, dpi=110)
        self.plt.close(figure)
        self.made.append((title, name))

    def lines(
        self, column: str, ylabel: str, title: str, name: str, *, extra: str | None = None,
        share: bool = False,
    ) -> None:  # fmt: skip
        """One curve per group (mean over its runs, the runs' range shaded); ``extra`` dashed, drawn
        over the solid curves; ``share``: a value in [0, 1], on an axis from 0 to 1."""
        from matplotlib.lines import Line2D

        figure, axes = self.new_figure()
        for index, group in enumerate(self.groups):
            epochs, mean, low, high = group.series(column)
            axes.plot(epochs, mean, marker="o", markersize=4, color=self.color(index), label=group.label)
            if len(group.runs) > 1:
                axes.fill_between(epochs, low, high, color=self.color(index), alpha=0.15, linewidth=0)
        handles = []
        if extra:
            for index, group in enumerate(self.groups):
                epochs, mean, _, _ = group.series(extra)
                axes.plot(epochs, mean, linestyle="--", marker="x", markersize=5, color=self.color(index),
                          linewidth=1.6, zorder=4)  # fmt: skip
            handles = [Line2D([], [], color="0.3", linestyle="--", marker="x", label="dashed: worst rank")]
        if share:
            axes.set_ylim(-0.02, 1.02)
        self.by_epoch(axes, "epoch", ylabel, title, handles)
        self.save(figure, title, name)

    def bytes_moved(self) -> None:
        """What moves at each epoch boundary: nothing after a run's last epoch, so no point there."""
        title = "Data moved per rank per epoch (store mode)"
        figure, axes = self.new_figure()
        drawn = False
        for index, group in enumerate(self.groups):
            points = moved_points(group)
            drawn = drawn or bool(points)
            axes.plot([e for e, _ in points], [m for _, m in points], marker="o", markersize=4,
                      color=self.color(index), label=group.label)  # fmt: skip
        if not drawn:
            axes.text(0.5, 0.5, "nothing moves: no run has an epoch after its first",
                      transform=axes.transAxes, ha="center", va="center")  # fmt: skip
        axes.set_ylim(bottom=0)
        self.by_epoch(axes, "epoch (data moved after it)", "MB sent per rank", title)
        self.save(figure, title, "bytes.png")

    def frontier(self) -> None:
        """Final accuracy against data moved across nodes per epoch (or, when no run sent any
        across nodes, to other ranks): what each group pays for what it reaches; the groups no
        other beats in both are joined by a dashed line."""
        column, points = frontier_basis(self.groups)
        if len(points) < 2:
            return
        across = column == "bytes_across_nodes"
        title = "Accuracy vs data moved across nodes" if across else "Accuracy vs data moved per rank"
        figure, axes = self.new_figure()
        for index, moved, accuracies in points:
            mean = statistics.fmean(accuracies)
            spread = [[mean - min(accuracies)], [max(accuracies) - mean]]
            axes.errorbar([moved], [mean], yerr=spread, marker="o", capsize=3, color=self.color(index),
                          label=self.groups[index].label)  # fmt: skip
        front = pareto([(moved, statistics.fmean(acc)) for _, moved, acc in points])
        axes.plot([c for c, _ in front], [v for _, v in front], "k--", alpha=0.5, label="frontier")
        if any(moved > 0 for _, moved, _ in points):
            axes.set_xscale("symlog", linthresh=max(1e-3, min((m for _, m, _ in points if m), default=1e-3)))
            axes.set_xlim(left=0)  # no negative ticks: nothing moves less than nothing
        else:
            axes.set_xlim(0, 1)
        axes.set_xlabel(
            "MB sent to other nodes per rank per epoch (dist.ranks_per_node ranks per node)"
            if across
            else "MB sent to other ranks per rank per epoch (no run sent any across nodes)"
        )
        axes.set_ylabel("final test accuracy (bars: seeds' range)")
        axes.set_title(title)
        axes.grid(alpha=0.3)
        if self.crowded:
            axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        else:
            axes.legend(fontsize=8)
        self.save(figure, title, "frontier.png")

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
        for index, group in enumerate(groups):
            if not bottoms[index] and group.runs[0].config.get("dist.virtual_ranks"):
                axes.text(index, 0, "virtual ranks:\nnot timed", ha="center", va="bottom", fontsize=8)
        axes.set_ylim(bottom=0)
        axes.set_xticks(range(len(groups)), [textwrap.fill(g.label, 24) for g in groups], rotation=20,
                        ha="right", fontsize=8)  # fmt: skip
        axes.set_ylabel("seconds per epoch (mean over ranks)")
        axes.set_title("Epoch time breakdown")
        axes.legend(fontsize=8)
        axes.grid(alpha=0.3, axis="y")
        self.save(figure, "Epoch time breakdown", "time_breakdown.png")
