"""Aggregate the scale study (studies/scale.sh): final test accuracy vs number of ranks.

Reads ``<root>/<partition>-<ranks>/runs/<strategy>-seed<k>/metrics/epochs.csv`` (the folders
``reshuffle compare`` writes), prints a Markdown table (mean +- std over seeds, seed count) per
partition and strategy, and writes a plot of accuracy vs ranks, one panel per partition.

Run: ``.venv/bin/python studies/scale_table.py runs/scale [--plot docs/img/scale-accuracy.png]``.
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
from collections import defaultdict
from pathlib import Path

FOLDER = re.compile(r"^(?P<partition>.+)-(?P<ranks>\d+)$")
RUN = re.compile(r"^(?P<strategy>.+)-seed(?P<seed>\d+)$")
ORDER = ["global", "local", "partial-0.1", "partial-0.01", "local_model.norm-sync-batch"]
LABELS = {"local_model.norm-sync-batch": "local + SyncBatchNorm"}


def collect(root: Path) -> dict[tuple[str, str, int], list[float]]:
    """(partition, strategy, ranks) -> final test accuracies of the finished runs."""
    results: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for study in sorted(root.iterdir()):
        folder = FOLDER.match(study.name)
        if not folder or not (study / "runs").is_dir():
            continue
        for run in sorted((study / "runs").iterdir()):
            match = RUN.match(run.name)
            epochs = run / "metrics" / "epochs.csv"
            config = run / "config.yaml"
            if not match or not epochs.is_file():
                continue
            rows = list(csv.DictReader(epochs.open()))
            wanted = _epochs(config)
            if not rows or (wanted is not None and len(rows) < wanted):
                continue  # unfinished
            key = (folder["partition"], match["strategy"], int(folder["ranks"]))
            results[key].append(float(rows[-1]["test_acc"]))
    return results


def _epochs(config: Path) -> int | None:
    if not config.is_file():
        return None
    found = re.search(r"^\s*epochs:\s*(\d+)", config.read_text(), re.MULTILINE)
    return int(found.group(1)) if found else None


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.3f} (1)"
    return f"{mean:.3f} +- {statistics.stdev(values):.3f} ({len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", type=Path)
    parser.add_argument("--plot", type=Path, help="PNG: accuracy vs ranks per strategy and partition")
    args = parser.parse_args()
    results = collect(args.root)
    partitions = sorted({p for p, _, _ in results}, key=lambda p: (p != "label-sorted", p))
    ranks = sorted({m for _, _, m in results})
    strategies = [s for s in ORDER if any(k[1] == s for k in results)]
    strategies += sorted({s for _, s, _ in results} - set(strategies))
    for partition in partitions:
        print(f"\n{partition} partitions: final test accuracy, mean +- std (seeds)\n")
        print("| strategy | " + " | ".join(f"{m} ranks" for m in ranks) + " |")
        print("| --- |" + " ---: |" * len(ranks))
        for strategy in strategies:
            cells = [cell(results.get((partition, strategy, m), [])) for m in ranks]
            print(f"| {LABELS.get(strategy, strategy)} | " + " | ".join(cells) + " |")
        print(f"\n{partition} partitions: difference from global, percentage points (means)\n")
        print("| strategy | " + " | ".join(f"{m} ranks" for m in ranks) + " |")
        print("| --- |" + " ---: |" * len(ranks))
        for strategy in strategies:
            if strategy == "global":
                continue
            cells = []
            for m in ranks:
                own, base = results.get((partition, strategy, m)), results.get((partition, "global", m))
                cells.append(
                    f"{100 * (statistics.mean(own) - statistics.mean(base)):+.1f}" if own and base else "-"
                )
            print(f"| {LABELS.get(strategy, strategy)} | " + " | ".join(cells) + " |")
    if args.plot:
        plot(results, partitions, strategies, args.plot)
        print(f"\nplot: {args.plot}")


def plot(results, partitions, strategies, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(
        1, len(partitions), figsize=(6 * len(partitions), 4.2), sharey=True, squeeze=False
    )
    for ax, partition in zip(axes[0], partitions, strict=True):
        for strategy in strategies:
            points = sorted((m, v) for (p, s, m), v in results.items() if p == partition and s == strategy)
            if not points:
                continue
            xs = [m for m, _ in points]
            means = [statistics.mean(v) for _, v in points]
            ax.plot(xs, means, marker="o", label=LABELS.get(strategy, strategy))
            lows = [min(v) for _, v in points]
            highs = [max(v) for _, v in points]
            ax.fill_between(xs, lows, highs, alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({m for (p, _, m) in results if p == partition}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("ranks (virtual), batch 8 per rank")
        ax.set_title(f"{partition} initial partitions")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("final test accuracy")
    axes[0][-1].legend(fontsize=8, loc="lower left")
    fig.suptitle("Fashion-MNIST, small BatchNorm CNN, 6 epochs: accuracy vs scale")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
