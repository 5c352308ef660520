"""Planner cost: time and peak memory of an epoch plan vs ``torch.randperm(N)``.

For N = 1.28M (ImageNet) and 10M, M in {8, 1024}, strategies global, local and partial-0.1:

* **index rank**: what a ``ShuffleSampler`` rank computes each epoch: its ``indices``;
* **store rank**: what a store-mode rank computes: ``indices``, ``sends`` and ``receives``, at
  steady state (epoch 51 after 50) and on a resume (a fresh planner asked for epoch 50);
* **all ranks**: every rank's store work for one epoch (what a simulator replays).

Baseline: ``torch.randperm(N)``, timed alternately in the same process. Target (issue 2): a
steady-state epoch plan within 3x of one randperm(N). Peak memory is numpy's traced peak
(tracemalloc) during the call.

Run: ``.venv/bin/python bench/plan.py [--quick]``.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from functools import partial

import torch

from common import machine, time_pair, timing, write_results
from reshuffle import ShufflePlanner
from reshuffle.report.table import format_table

STRATEGIES = (("global", 0.0), ("local", 0.0), ("partial", 0.1))


def store_work(planner: ShufflePlanner, epoch: int, rank: int) -> None:
    """What a store-mode rank computes per epoch: its order and its exchange."""
    plan = planner.plan(epoch)
    plan.indices(rank)
    plan.sends(rank)
    plan.receives(rank)


def index_work(planner: ShufflePlanner, epoch: int, rank: int) -> None:
    """What an index-mode rank (ShuffleSampler) computes per epoch: its order."""
    planner.plan(epoch).indices(rank)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_bytes(fn) -> int:
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def measure(n: int, m: int, strategy: str, fraction: float, repeats: int) -> dict:
    def fresh() -> ShufflePlanner:
        return ShufflePlanner(n, m, strategy=strategy, fraction=fraction, seed=0)

    first, following, index_next, randperm = [], [], [], []
    for _ in range(repeats):
        writer, reader = fresh(), fresh()
        first.append(seconds(partial(store_work, writer, 50, 0)))
        following.append(seconds(partial(store_work, writer, 51, 0)))
        index_work(reader, 50, 0)
        index_next.append(seconds(partial(index_work, reader, 51, 0)))
        randperm.append(seconds(partial(torch.randperm, n)))
    planner = fresh()
    store_work(planner, 50, 0)
    peak = peak_bytes(lambda: store_work(planner, 51, 0))
    epochs = iter(range(52, 10_000))
    all_ranks, all_baseline = time_pair(
        lambda: [store_work(planner, e, r) for e in [next(epochs)] for r in range(m)],
        lambda: torch.randperm(n),
        max(2, repeats // 2),
    )
    return {
        "n": n,
        "m": m,
        "strategy": strategy if strategy != "partial" else f"partial-{fraction}",
        "store_first": timing(first),
        "store_next": timing(following),
        "index_next": timing(index_next),
        "all_ranks_next": all_ranks,
        "randperm": timing([*randperm, all_baseline.median_s]),
        "rank_peak_bytes": peak,
        "randperm_bytes": 8 * n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="N=1.28M only, 3 repeats")
    args = parser.parse_args()
    sizes = (1_280_000,) if args.quick else (1_280_000, 10_000_000)
    repeats = 3 if args.quick else 5
    results = [measure(n, m, s, q, repeats) for n in sizes for m in (8, 1024) for s, q in STRATEGIES]
    rows = [
        (
            f"{r['n'] / 1e6:g}M",
            r["m"],
            r["strategy"],
            r["randperm"].median_s * 1e3,
            r["index_next"].median_s / r["randperm"].median_s,
            r["store_next"].median_s / r["randperm"].median_s,
            r["store_first"].median_s / r["randperm"].median_s,
            r["all_ranks_next"].median_s / r["randperm"].median_s,
            r["rank_peak_bytes"] / 2**20,
            r["randperm_bytes"] / 2**20,
            f"{r['store_next'].spread:.0%}",
        )
        for r in results
    ]
    headers = [
        "N", "M", "strategy", "randperm ms", "index rank", "store rank", "store rank, resume at 50",
        "all ranks", "rank peak MiB", "randperm MiB", "spread",
    ]  # fmt: skip
    table = format_table(headers, rows, markdown=True)
    print(table)
    worst_index = max(r["index_next"].median_s / r["randperm"].median_s for r in results)
    worst_store = max(r["store_next"].median_s / r["randperm"].median_s for r in results)
    markdown = f"""## Planner: epoch plan vs `torch.randperm(N)` (`bench/plan.py`)

{machine()}; median of {repeats} repeats. Columns "index rank" to "all ranks" are times as a
multiple of one `torch.randperm(N)` measured in the same run (lower is better). An index-mode rank
computes its `indices` (what `ShuffleSampler` needs); a store-mode rank also its `sends` and
`receives`. Steady state is epoch 51 right after epoch 50; "resume at 50" is a fresh planner's
first call at epoch 50 (`partial` replays 50 epochs of draws). "all ranks" is every rank's store
work for one epoch (what a simulator replays). Peak memory is numpy's traced peak for one store
rank's epoch; spread = (max - min) / median of the store-rank time.

{table}

Target (issue 2): a steady-state epoch plan within 3x of one `randperm(N)`.
Worst steady-state rank: index mode {worst_index:.2f}x, store mode {worst_store:.2f}x:
**{"met" if max(worst_index, worst_store) <= 3 else "not met"}**.
A rank's memory is O(N/M): at M = 1024 it is far below the 8N bytes of one permutation.
"""
    write_results("plan", results, markdown)


if __name__ == "__main__":
    main()
