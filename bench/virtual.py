"""Virtual ranks vs real processes: samples/s of the same 4-rank training, one process vs four.

Both are real ``reshuffle run`` jobs of the small CNN (Fashion-MNIST when installed, else
synthetic data of the same shape), ``global`` shuffling, batch 64 per rank, identical plans; the
real job runs 4 gloo processes on this 2-core machine (oversubscribed), the virtual one trains all
4 ranks in one process (no communication). Interleaved repeats; medians of the mean over epochs
>= 1 of samples/s (training only) and of wall time per run (start-up included).

Run: ``.venv/bin/python bench/virtual.py [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_results
from train import FMNIST, figures, run_variant


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--train-samples", type=int, default=12000)
    args = parser.parse_args()

    data = ["data.name=fashion-mnist" if FMNIST.exists() else "data.name=synthetic"]
    data += [f"data.train_limit={args.train_samples}", "data.test_limit=2000", "shuffle.strategy=global",
             "shuffle.fraction=0"]  # fmt: skip
    variants = {"real": [], "virtual": [f"dist.virtual_ranks={args.ranks}"]}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    walls: dict[str, list[float]] = {name: [] for name in variants}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-virtual-") as tmp:
        for repeat in range(args.repeats):
            for name, overrides in variants.items():
                nproc = args.ranks if name == "real" else 1
                began = time.perf_counter()
                rows = run_variant(Path(tmp), f"{name}-{repeat}", data, overrides, args.epochs, nproc)
                walls[name].append(time.perf_counter() - began)
                runs[name].append(figures(rows, nproc))
                print(f"{name}-{repeat}: {runs[name][-1]['samples_per_s']:.0f} samples/s", flush=True)

    ratios = [
        v["samples_per_s"] / r["samples_per_s"] for v, r in zip(runs["virtual"], runs["real"], strict=True)
    ]
    table = {
        name: {
            "samples_per_s": statistics.median(r["samples_per_s"] for r in runs[name]),
            "wall_s": statistics.median(walls[name]),
            "test_acc": statistics.median(r["test_acc"] for r in runs[name]),
        }
        for name in variants
    }
    results = {
        "machine": machine(),
        "args": vars(args),
        "variants": table,
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "seconds": time.perf_counter() - started,
    }
    lines = [
        "## Virtual ranks vs real processes (`bench/virtual.py`)",
        "",
        f"{results['machine']}. {args.ranks} ranks of the small CNN, batch 64 per rank, "
        f"{args.train_samples} training samples, {args.epochs} epochs, median of {args.repeats} "
        f"interleaved repeats. Total {results['seconds']:.0f} s.",
        "",
        "| run | training samples/s | wall s per run (start-up included) | final test acc |",
        "| --- | --- | --- | --- |",
        *(
            f"| {name} | {row['samples_per_s']:.0f} | {row['wall_s']:.1f} | {row['test_acc']:.3f} |"
            for name, row in table.items()
        ),
        "",
        f"Virtual / real samples/s: {results['ratio']:.2f}x "
        f"({results['ratio_min']:.2f}-{results['ratio_max']:.2f}); "
        f"wall time per run, start-up included, real / virtual: "
        f"{table['real']['wall_s'] / table['virtual']['wall_s']:.2f}x. Both runs keep the two cores busy "
        "with the same forward and backward work, so the training rate is about equal; what virtual ranks "
        "save is the start-up of M processes and their memory (one model, one optimizer), which is what "
        "lets M reach 1,024 on one machine (tests/test_virtual.py trains 1,024 ranks in about 1.2 GB).",
    ]
    markdown = "\n".join(lines)
    write_results("virtual", results, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
