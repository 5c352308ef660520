"""Shared by the benchmarks: repeated timing with median and spread, and writing results.

Every figure is a ratio against a baseline measured in the same process, interleaved with the
thing measured, so machine noise (about +-10% here) hits both alike. Each benchmark writes
``bench/out/<name>.json`` and replaces its own section of ``docs/benchmarks.md`` (between
``<!-- bench:<name> -->`` markers).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
DOC = ROOT / "docs" / "benchmarks.md"


@dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    repeats: int

    @property
    def spread(self) -> float:
        """(max - min) / median."""
        return (self.max_s - self.min_s) / self.median_s if self.median_s else 0.0


def timing(samples: list[float]) -> Timing:
    return Timing(statistics.median(samples), min(samples), max(samples), len(samples))


def time_pair(
    measured: Callable[[], object], baseline: Callable[[], object], repeats: int
) -> tuple[Timing, Timing]:
    """Time ``measured`` and ``baseline`` alternately, ``repeats`` times each."""
    a, b = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        measured()
        a.append(time.perf_counter() - start)
        start = time.perf_counter()
        baseline()
        b.append(time.perf_counter() - start)
    return timing(a), timing(b)


def spawn_ranks(fn: Callable[..., object], world_size: int, *args: object, timeout_s: float = 600) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned gloo processes; their results.

    Rendezvous is a FileStore in a temporary directory; a failing or hung rank fails the run.
    """
    import multiprocessing
    import pickle
    import tempfile

    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        processes = [
            context.Process(target=_rank_entry, args=(rank, world_size, tmp, fn, args, timeout_s))
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout_s
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():
                process.kill()
        results = []
        for rank, process in enumerate(processes):
            path = Path(tmp) / f"{rank}.pkl"
            if process.exitcode != 0 or not path.exists():
                raise RuntimeError(
                    f"benchmark rank {rank} failed (exit code {process.exitcode}); see its output above"
                )
            results.append(pickle.loads(path.read_bytes()))
        return results


def _rank_entry(
    rank: int, world_size: int, tmp: str, fn: Callable[..., object], args: tuple, timeout_s: float
) -> None:
    import datetime
    import os
    import pickle

    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import multiprocessing

    # as under torchrun, whose ranks are plain processes: their DataLoader workers are forked
    # (a spawned rank would spawn them too, a second of imports each)
    multiprocessing.set_start_method("fork", force=True)
    store = dist.FileStore(str(Path(tmp) / "rendezvous"), world_size)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s)
    )
    result = fn(rank, world_size, *args)
    (Path(tmp) / f"{rank}.pkl").write_bytes(pickle.dumps(result))
    dist.destroy_process_group()


def machine() -> str:
    return (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}, "
        f"torch {torch.__version__}, numpy {np.__version__}"
    )


def write_results(name: str, results: object, markdown: str) -> None:
    """Save JSON and replace the ``name`` section of docs/benchmarks.md with ``markdown``."""
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(_plain(results), indent=2) + "\n")
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def _plain(value: object) -> object:
    if isinstance(value, Timing):
        return {**asdict(value), "spread": value.spread}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
