"""Aggregate the node-aware shuffling study (studies/nodes.sh): accuracy against per-epoch cost.

Reads ``<root>/<partition>-<ranks>[-r<R>]/runs/<strategy>-seed<k>/metrics/epochs.csv`` (what
``reshuffle compare`` writes). Per configuration it prints the final test accuracy (mean +- std
over seeds) and two per-epoch costs per rank:

* data moved **across nodes** (MB): measured in the runs (``bytes_across_nodes``, nodes of R
  ranks); for the rank-level ``global`` the planner's sends re-counted with nodes of R ranks;
* **network seconds** from the simulator (``reshuffle.simulate``, the ABCI-like cluster with R
  workers per node, this study's data set and model): the exchange of what moves (across nodes
  on the network, within a node on its links, into the stores) plus SyncBatchNorm's collectives
  (all ranks, or a node's on its links). The exchange can overlap compute; SyncBatchNorm cannot.

and draws the frontier: accuracy against network seconds per epoch, one panel per (ranks, R), the
configurations no other beats in both joined by a line (and the same against MB across nodes).

Run: ``.venv/bin/python studies/nodes_table.py runs/nodes [--plot docs/img/nodes-frontier.png]``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import re
import statistics
from collections import defaultdict
from pathlib import Path

from scale_table import cell  # studies/ is the script's folder: mean +- std (seeds)

from reshuffle.plan import ShufflePlanner
from reshuffle.report.figures import pareto
from reshuffle.simulate import CLUSTERS, WORKLOADS
from reshuffle.simulate.model import exchange_s, syncbn_step_s

FOLDER = re.compile(
    r"^(?P<partition>label-sorted|random|classes\d+-random)-(?P<ranks>\d+)(-r(?P<node>\d+))?$"
)
RUN = re.compile(r"^(?P<strategy>.+)-seed(?P<seed>\d+)$")
SYNC, NODE = "model.norm-sync-batch", "shuffle.level-node"
LABELS = {  # compare's folder slug -> (label, node-level plan, SyncBN group: None, "all" or "node")
    "global": ("global", False, None),
    "local": ("local (per rank)", False, None),
    f"local_{SYNC}_dist.virtual_batch_limit-8192": ("local + SyncBN (all ranks)", False, "all"),
    f"local_{NODE}": ("node-local", True, None),
    f"partial-0.1_{NODE}": ("node-local + partial 0.1 across nodes", True, None),
    f"local_{SYNC}_model.sync_group-node": ("local + SyncBN (node)", False, "node"),
    f"local_{NODE}_{SYNC}_model.sync_group-node": ("node-local + SyncBN (node)", True, "node"),
}
SAMPLES, SAMPLE_BYTES = 24_000, 784


def batch_for(ranks: int) -> int:
    """studies/nodes.sh's per-rank batch: 8, or 2048 / M beyond 256 ranks."""
    return 2048 // ranks if ranks > 256 else 8


def collect(root: Path) -> dict[tuple[str, int, int | None, str], list[dict[str, float]]]:
    """(partition, ranks, R or None, strategy) -> per seed: final accuracy and mean per-epoch costs."""
    results: dict[tuple[str, int, int | None, str], list[dict[str, float]]] = defaultdict(list)
    for study in sorted(root.iterdir()):
        folder = FOLDER.match(study.name)
        if not folder or not (study / "runs").is_dir():
            continue
        for run in sorted((study / "runs").iterdir()):
            match = RUN.match(run.name)
            path = run / "metrics" / "epochs.csv"
            if not match or not path.is_file():
                continue
            rows = list(csv.DictReader(path.open()))
            if len(rows) < 4:
                continue  # unfinished
            world = int(rows[0]["world_size"])
            moving = rows[:-1]  # nothing moves after the last epoch
            node = int(folder["node"]) if folder["node"] else None
            key = (folder["partition"], int(folder["ranks"]), node, match["strategy"])
            results[key].append(
                {
                    "acc": float(rows[-1]["test_acc"]),
                    "moved": statistics.mean(float(r["samples_moved"]) for r in moving) / world,
                    "across_mb": statistics.mean(float(r["bytes_across_nodes"]) for r in moving)
                    / world
                    / 1e6,
                    "seed": int(match["seed"]),
                }
            )
    return results


def global_across(ranks: int, per_node: int, seed: int) -> float:
    """Samples per rank and epoch ``global`` sends to other nodes (epoch 0 -> 1, nodes of R)."""
    planner = ShufflePlanner(SAMPLES, ranks, strategy="global", seed=seed)
    plan = planner.plan(0)
    across = sum(
        ids.size
        for r in range(ranks)
        for dst, ids in plan.sends(r).items()
        if dst // per_node != r // per_node
    )
    return across / ranks


def network_s(strategy: str, ranks: int, per_node: int, moved: float, across: float) -> dict[str, float]:
    """Simulated seconds per epoch: exchange (network and node links) and SyncBatchNorm."""
    group = LABELS[strategy][2]
    batch = batch_for(ranks)
    workload = dataclasses.replace(WORKLOADS["fashion-mnist"], num_samples=SAMPLES, batch_size=batch)
    cluster = CLUSTERS["abci"].with_(node_workers=per_node)
    links = cluster.with_(bandwidth_Bps=cluster.intra_bandwidth_Bps, latency_s=cluster.intra_latency_s)
    within = moved - across
    exchange = exchange_s(cluster, ranks, round(across), SAMPLE_BYTES, SAMPLES)
    exchange += exchange_s(links, per_node, round(within), SAMPLE_BYTES, SAMPLES)
    per_rank = -(-SAMPLES // ranks)
    steps = -(-per_rank // batch)
    syncbn = (
        steps * syncbn_step_s(workload, cluster, ranks, None if group == "all" else group) if group else 0
    )
    return {"exchange_s": exchange, "syncbn_s": syncbn, "cost_s": exchange + syncbn}


def rows_for(results, partition: str, ranks: int, per_node: int) -> list[dict]:
    rows = []
    for strategy, (label, node_level, group) in LABELS.items():
        runs = results.get((partition, ranks, per_node if node_level or group == "node" else None, strategy))
        if not runs:
            continue
        moved = statistics.mean(r["moved"] for r in runs)
        if strategy == "global":  # its runs had no nodes: count its sends again with nodes of R
            across = statistics.mean(global_across(ranks, per_node, r["seed"]) for r in runs)
        else:  # node-level plans: measured with nodes of R; rank-level local plans move nothing
            across = statistics.mean(r["across_mb"] * 1e6 / SAMPLE_BYTES for r in runs)
        accs = [r["acc"] for r in runs]
        rows.append(
            {
                "label": label, "accs": accs, "across_mb": across * SAMPLE_BYTES / 1e6,
                **network_s(strategy, ranks, per_node, moved, across),
            }
        )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", type=Path)
    parser.add_argument("--plot", type=Path, help="PNG: the frontier per (ranks, R), label-sorted partitions")
    args = parser.parse_args()
    results = collect(args.root)
    scales = sorted({m for p, m, _, _ in results if p in ("label-sorted", "random")})
    panels = []
    for partition in ("label-sorted", "random"):
        for per_node in (4, 8):
            print(
                f"\n{partition} partitions, nodes of {per_node} ranks: final test accuracy (seeds); per rank "
                "and epoch: MB across nodes, simulated network s (exchange + SyncBN)\n"
            )
            print("| configuration | " + " | ".join(f"{m} ranks" for m in scales) + " |")
            print("| --- |" + " ---: |" * len(scales))
            table = {m: rows_for(results, partition, m, per_node) for m in scales}
            for label, _, _ in LABELS.values():
                cells = []
                for m in scales:
                    row = next((r for r in table[m] if r["label"] == label), None)
                    cells.append(
                        f"{cell(row['accs'])}; {row['across_mb']:.3g} MB; {row['exchange_s']:.3g} + "
                        f"{row['syncbn_s']:.3g} s"
                        if row
                        else "-"
                    )
                if any(c != "-" for c in cells):
                    print(f"| {label} | " + " | ".join(cells) + " |")
            if partition == "label-sorted":
                node_rows = {label for label, level, group in LABELS.values() if level or group == "node"}
                panels += [
                    (m, per_node, table[m]) for m in scales if node_rows & {r["label"] for r in table[m]}
                ]  # a panel where node sizes were run
    probe = {k: v for k, v in results.items() if k[0].startswith("classes")}
    for (partition, m, _, strategy), runs in sorted(probe.items()):
        print(f"\n{partition}, {m} ranks, {strategy}: {cell([r['acc'] for r in runs])}")
    if args.plot and panels:
        plot(panels, args.plot)
        print(f"\nplot: {args.plot}")


def plot(panels, path: Path) -> None:
    """Two rows of panels, one column per (ranks, R): accuracy against MB sent across nodes, and
    against simulated network seconds; the configurations no other beats joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    costs = [("across_mb", "MB sent across nodes per rank per epoch", 1e-3),
             ("cost_s", "simulated network s per rank per epoch\n(exchange + SyncBN)", 1e-4)]  # fmt: skip
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 8), sharey=True, squeeze=False)
    markers = dict(zip([label for label, _, _ in LABELS.values()], "os^vDPX", strict=True))
    for column, (m, per_node, rows) in enumerate(panels):
        for (key, xlabel, linear), ax in zip(costs, axes[:, column], strict=True):
            for row in rows:
                mean = statistics.mean(row["accs"])
                ax.errorbar(
                    row[key], mean, yerr=[[mean - min(row["accs"])], [max(row["accs"]) - mean]],
                    marker=markers[row["label"]], linestyle="none", capsize=3, label=row["label"],
                )  # fmt: skip
            front = pareto([(row[key], statistics.mean(row["accs"])) for row in rows])
            ax.plot([c for c, _ in front], [v for _, v in front], "k--", alpha=0.5)
            ax.set_xscale("symlog", linthresh=linear)
            ax.set_title(f"{m} ranks, nodes of {per_node}")
            ax.set_xlabel(xlabel, fontsize=8)
            ax.grid(True, alpha=0.3)
    for row_axes in axes:
        row_axes[0].set_ylabel("final test accuracy")
    legend = {}  # label -> handle, from every panel (a panel may lack a configuration)
    for ax in axes.flat:
        legend.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    order = [label for label, _, _ in LABELS.values() if label in legend]
    fig.legend([legend[label] for label in order], order, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(
        "Label-sorted partitions, Fashion-MNIST (24,000 images), 4 epochs: accuracy vs per-epoch cost "
        "(batch 8 per rank; 2 at 1,024 ranks)"
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
