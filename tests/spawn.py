"""Run a function in N spawned CPU processes joined by a gloo process group, with a hard timeout.

Rendezvous goes through a FileStore in a temporary directory, so parallel tests never fight over
ports. A rank that raises fails the test with its traceback; a rank that hangs is killed when the
timeout expires and the test fails saying so. No test returns early when setup fails.
"""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(
    rank: int, fn: Callable[..., Any], world_size: int, store_path: str, out_dir: str, args: tuple
) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60)
    )
    try:
        result = fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as handle:
        pickle.dump(result, handle)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120) -> list[Any]:
    """``[fn(rank, world_size, *args) for each rank]``, each run in its own process."""
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.start_processes(
            _entry,
            args=(fn, world_size, os.path.join(tmp, "store"), tmp, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"ranks did not finish within {timeout} s")
        results = []
        for rank in range(world_size):
            with open(os.path.join(tmp, f"{rank}.pkl"), "rb") as handle:
                results.append(pickle.load(handle))
        return results
