"""Run a function in N spawned CPU processes joined by a gloo process group, with a hard timeout.

Rendezvous goes through a FileStore in a temporary directory, so parallel tests never fight over
ports. :func:`run_ranks` fails the test with each failing rank's traceback; :func:`launch`
reports every rank's outcome (value, traceback, or the signal that killed it) for tests where a
rank is meant to die. A rank still running at the deadline is killed and reported as hung; no
test returns early when setup fails.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing
import os
import pickle
import signal
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class RankOutcome:
    rank: int
    exitcode: int | None  # None: still running at the deadline (killed as hung)
    value: Any = None
    error: str | None = None  # the traceback, when the function raised

    @property
    def ok(self) -> bool:
        return self.exitcode == 0 and self.error is None


def _entry(
    rank: int, fn: Callable[..., Any], world_size: int, tmp: str, args: tuple, timeout_s: float
) -> None:
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result_path = os.path.join(tmp, f"{rank}.result")
    try:
        store = dist.FileStore(os.path.join(tmp, "rendezvous"), world_size)
        dist.init_process_group(
            "gloo",
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        value = fn(rank, world_size, *args)
        outcome = ("value", value)
    except BaseException:  # reported to the parent, which fails the test
        outcome = ("error", traceback.format_exc())
    with open(result_path + ".tmp", "wb") as handle:
        pickle.dump(outcome, handle)
    os.replace(result_path + ".tmp", result_path)
    # Skip destroy_process_group: with a dead peer it can block; the process is ending anyway.
    os._exit(0 if outcome[0] == "value" else 1)


def launch(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120, pg_timeout_s: float = 60
) -> list[RankOutcome]:
    """Run ``fn(rank, world_size, *args)`` on every rank; never raises for a failed rank."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        processes = [
            context.Process(target=_entry, args=(rank, fn, world_size, tmp, args, pg_timeout_s))
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        outcomes = []
        for rank, process in enumerate(processes):
            if process.is_alive():
                process.kill()
                process.join()
                outcomes.append(
                    RankOutcome(rank, None, error=f"rank {rank} still running after {timeout} s (hung)")
                )
                continue
            path = os.path.join(tmp, f"{rank}.result")
            outcome = RankOutcome(rank, process.exitcode)
            if os.path.exists(path):
                with open(path, "rb") as handle:
                    kind, payload = pickle.load(handle)
                if kind == "value":
                    outcome.value = payload
                else:
                    outcome.error = payload
            outcomes.append(outcome)
        return outcomes


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120) -> list[Any]:
    """``[fn(rank, world_size, *args) for each rank]``, each in its own process; any failure fails."""
    outcomes = launch(fn, world_size, *args, timeout=timeout)
    failures = [o for o in outcomes if not o.ok]
    if failures:
        details = "\n".join(f"--- rank {o.rank} (exit code {o.exitcode}):\n{o.error}" for o in failures)
        raise AssertionError(f"{len(failures)} of {world_size} ranks failed:\n{details}")
    return [o.value for o in outcomes]


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (torchrun starts its ranks in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def run_command(
    command: list[str], timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True)`` with a hard timeout that says
    where the processes hung: at the deadline every process of the tree gets SIGABRT, and the
    fault handler (``PYTHONFAULTHANDLER``, inherited by ranks and DataLoader workers) prints each
    one's threads to stderr, which the failure shows."""
    env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = _tree(process.pid)
        for pid in reversed(tree):  # the ranks and workers before their launcher
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)
        try:
            out, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # one did not die of it (or an orphan holds the pipes)
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            out, err = process.communicate()
        raise AssertionError(
            f"{' '.join(command)} still running after {timeout} s (hung); its stdout ends:\n{out[-3000:]}\n"
            f"its stderr, with every process's threads, ends:\n{err[-20000:]}"
        ) from None
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it (a node lost), then reap it."""
    for pid in _tree(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=30)
