"""Our exchange vs a reference-style exchange, same Q, same data, same ranks.

The reference style is that of the IPDPS 2022 paper's code: every rank derives the epoch's plan
from one global permutation of all N ids (Python), then moves samples one at a time, each as a
pickled message (a length message, then the payload) followed by a barrier. Arrivals are written
one file per sample. Ours: ``Exchanger.exchange`` (planner O(N/M + M), counts then payload in
bounded chunks, fixed-layout headers, crc32, pack files, fsync, two-phase commit). Both stores live
on tmpfs (``/dev/shm``) so that the disk does not dominate, and both move exactly the ids our
planner picks for ``partial`` with the given Q.

The figures also calibrate ``reshuffle simulate --implementation per-sample``: the reference's
planning cost per sample of N and its cost per moved sample (message + barrier) on this machine.

Run: ``.venv/bin/python bench/reference.py [--quick]``.
"""

from __future__ import annotations

import argparse
import pickle
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import machine, spawn_ranks, write_results


def _reference_exchange(num, epoch, outgoing, incoming, payload, inbox, group) -> float:
    """The reference style; returns its planning seconds."""
    import torch
    import torch.distributed as dist

    started = time.perf_counter()
    # Reference-style plan: one global permutation of all N ids and an id -> slot map.
    order = list(range(num))
    random.Random(epoch).shuffle(order)
    slot = {sample: position for position, sample in enumerate(order)}
    planning = time.perf_counter() - started
    # One pickled message per sample and a barrier after each; every rank takes part in every
    # step (the counts are equal under partial: k leave and k arrive per rank).
    for step in range(max(len(outgoing), len(incoming))):
        requests = []
        if step < len(outgoing):
            dst, sample = outgoing[step]
            data, label = payload[sample]
            message = pickle.dumps((sample, int(label), bytes(data), slot[sample]))
            length = torch.tensor([len(message)], dtype=torch.int64)
            requests.append(dist.isend(length, dst, group=group))
            requests.append(
                dist.isend(torch.frombuffer(bytearray(message), dtype=torch.uint8), dst, group=group)
            )
        if step < len(incoming):
            src, _ = incoming[step]
            length = torch.empty(1, dtype=torch.int64)
            dist.recv(length, src, group=group)
            buffer = torch.empty(int(length.item()), dtype=torch.uint8)
            dist.recv(buffer, src, group=group)
            sample, label, data, _ = pickle.loads(buffer.numpy().tobytes())
            (inbox / f"{sample}.bin").write_bytes(data)
        for request in requests:
            request.wait()
        dist.barrier(group=group)
    return planning


class _Training:
    """A small CNN training in a background Python thread: the GIL and the cores are busy, as
    they are when an exchange overlaps an epoch."""

    def __init__(self) -> None:
        import threading

        import torch

        self.stop = threading.Event()
        self.steps = 0
        model = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(16 * 14 * 14, 10),
        )  # fmt: skip
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        images, labels = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))

        def loop() -> None:
            while not self.stop.is_set():
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(images), labels).backward()
                optimizer.step()
                self.steps += 1

        self.thread = threading.Thread(target=loop, daemon=True)

    def __enter__(self) -> _Training:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _rank(
    rank: int, world: int, root: str, num: int, fraction: float, repeats: int, sample_bytes: int
) -> dict:
    import contextlib

    import torch
    import torch.distributed as dist

    from reshuffle import ShufflePlanner
    from reshuffle.data.synthetic import load_synthetic
    from reshuffle.store import Exchanger, new_exchange_group, stage

    torch.set_num_threads(1)
    source = load_synthetic("train", num_samples=num, shape=(1, 8, 8), sample_bytes=sample_bytes)
    planner = ShufflePlanner(num, world, strategy="partial", fraction=fraction, seed=1)
    store, _ = stage(Path(root) / "ours", rank, source, planner)
    group = new_exchange_group(120)
    exchanger = Exchanger(store, planner, group=group, chunk_bytes=64 << 20)
    exchanger.exchange(0)  # warm
    inbox = Path(root) / "reference" / f"rank-{rank}"
    inbox.mkdir(parents=True, exist_ok=True)
    rows = {condition: {"ours": [], "reference": [], "planning": []} for condition in ("quiet", "training")}
    moved = 0
    for epoch in range(1, 2 * repeats + 1):
        condition = "quiet" if epoch % 2 else "training"
        sends = planner.plan(epoch).sends(rank)
        receives = planner.plan(epoch).receives(rank)
        outgoing = [(int(dst), int(i)) for dst, ids in sorted(sends.items()) for i in ids]
        incoming = [(int(src), int(i)) for src, ids in sorted(receives.items()) for i in ids]
        payload = {i: store.sample(i) for _, i in outgoing}  # read before our exchange drops them
        moved = len(outgoing)
        with _Training() if condition == "training" else contextlib.nullcontext():
            dist.barrier(group=group)
            started = time.perf_counter()
            exchanger.exchange(epoch)
            rows[condition]["ours"].append(time.perf_counter() - started)
            dist.barrier(group=group)
            started = time.perf_counter()
            planning = _reference_exchange(num, epoch, outgoing, incoming, payload, inbox, group)
            rows[condition]["reference"].append(time.perf_counter() - started)
            rows[condition]["planning"].append(planning)
    return {"rows": rows, "moved": moved}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer samples and repeats")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument(
        "--sample-bytes",
        type=int,
        default=110_000,
        help="bytes per sample (default: an ImageNet JPEG's ~110 KB)",
    )
    args = parser.parse_args()
    num, repeats = (2048, 2) if args.quick else (8192, 5)
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    started = time.perf_counter()
    root = tempfile.mkdtemp(prefix="reshuffle-reference-", dir=base)
    try:
        results = spawn_ranks(
            _rank, args.ranks, root, num, args.fraction, repeats, args.sample_bytes, timeout_s=1200
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    moved = results[0]["moved"]
    summary = {
        "machine": machine(),
        "ranks": args.ranks,
        "num_samples": num,
        "sample_bytes": args.sample_bytes,
        "fraction": args.fraction,
        "moved_per_rank": moved,
        "store": "tmpfs" if base else "temporary directory",
    }
    table = []
    for condition in ("quiet", "training"):
        # Per repeat, the slowest rank (an exchange ends when every rank has finished).
        def slowest(key: str, condition: str = condition) -> list[float]:
            return [max(r["rows"][condition][key][i] for r in results) for i in range(repeats)]

        ours, reference, planning = slowest("ours"), slowest("reference"), slowest("planning")
        speedups = [b / a for a, b in zip(ours, reference, strict=True)]
        per_sample = [(r - p) / moved for r, p in zip(reference, planning, strict=True)]
        summary[condition] = {
            "ours_s": statistics.median(ours),
            "reference_s": statistics.median(reference),
            "speedup": statistics.median(speedups),
            "speedup_min": min(speedups),
            "speedup_max": max(speedups),
            "reference_plan_s_per_sample": statistics.median(planning) / num,
            "reference_per_sample_s": statistics.median(per_sample),
        }
        figures = summary[condition]
        table.append(
            f"| {condition} | {figures['reference_s']:.3f} | {figures['ours_s']:.3f} | "
            f"**{figures['speedup']:.1f}x** ({figures['speedup_min']:.1f}-{figures['speedup_max']:.1f}) | "
            f"{figures['reference_plan_s_per_sample'] * 1e6:.2f} | "
            f"{figures['reference_per_sample_s'] * 1e3:.2f} |"
        )
    summary["seconds"] = time.perf_counter() - started
    markdown = "\n".join(
        [
            "## Reference-style exchange vs ours (`bench/reference.py`)",
            "",
            f"{summary['machine']}. {args.ranks} ranks (gloo), partial Q = {args.fraction}: "
            f"{moved} samples of {args.sample_bytes:,} B leave each rank per exchange ({num} samples in "
            f"all), stores on {summary['store']}; median of {repeats} exchanges per condition, each timed on "
            "its slowest rank, conditions interleaved. Reference style: a Python global permutation of all N "
            "ids per epoch, then per sample a pickled message (length, payload) and a barrier, arrivals one "
            'file each. "training": a small CNN trains in a background thread of every rank meanwhile '
            f"(the GIL and the cores are busy, as when an exchange overlaps an epoch). Total "
            f"{summary['seconds']:.0f} s.",
            "",
            "| condition | reference s | ours s | ours faster by | reference plan us per sample of N "
            "| reference ms per moved sample |",
            "| --- | --- | --- | --- | --- | --- |",
            *table,
            "",
            "The last two columns are what `reshuffle simulate --implementation per-sample` takes as the "
            "reference style's costs (`--per-sample-ms`; see docs/simulate.md).",
        ]
    )
    write_results("reference", summary, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
