"""Joining the process group. Only this module reads the launcher's environment.

Under ``torchrun``, ``srun ... torchrun`` or ``reshuffle run --nproc N`` (PyTorch's elastic
agent) the environment holds ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; without them the job is one process and needs no network.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from reshuffle.config import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    backend: str  # gloo or nccl
    device: torch.device
    local_world: int = 1  # ranks on this node (torchrun's LOCAL_WORLD_SIZE)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def choose_backend(requested: str, local_world: int = 1) -> str:
    """The process-group backend for ``local_world`` ranks on this node.

    ``auto``: NCCL when this node has a CUDA GPU for every local rank, gloo (training on CPU)
    otherwise. NCCL refuses two ranks on one GPU, so ``nccl`` with fewer GPUs than local ranks is
    an error that says so, not a hang or a CUDA error at the first collective.
    """
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested == "auto":
        return "nccl" if gpus >= max(local_world, 1) else "gloo"
    if requested == "nccl" and gpus == 0:
        raise ConfigError("backend: nccl needs CUDA GPUs, and none is available; use backend: gloo (or auto)")
    if requested == "nccl" and gpus < local_world:
        raise ConfigError(
            f"backend: nccl needs one GPU per rank, but this node runs {local_world} ranks and has {gpus} "
            f"GPU(s); start at most {gpus} processes per node (dist.nproc / --nproc-per-node), or use "
            "backend: gloo (or auto, which falls back to gloo on CPU)"
        )
    return requested


def virtual_placement(place: str, nproc: int, gpus: int, mode: str, backend: str) -> str | None:
    """Why ``nproc`` local ranks train as virtual ranks in one process (the line to print), or None.

    ``dist.place=virtual`` always; ``auto`` when the machine has GPUs but fewer than ``nproc``
    (NCCL needs a GPU per rank, so processes would train on the CPU and leave the GPUs idle),
    the backend is ``auto`` and the run reads the dataset directly (index mode)."""
    if nproc < 2 or place == "processes":
        return None
    if place == "virtual":
        return f"dist.place=virtual: {nproc} ranks train as {nproc} virtual ranks in one process"
    if not 0 < gpus < nproc or mode != "index" or backend != "auto":
        return None
    return (
        f"{nproc} ranks and {gpus} GPU(s): training them as {nproc} virtual ranks on the GPU (one process, "
        "DDP's semantics exactly; per-step timing columns are not measured). dist.place=processes starts "
        f"{nproc} processes on the CPU instead; --nproc {gpus} trains {gpus} rank(s) on the GPU(s)"
    )


def idle_gpu_advice(nproc: int, gpus: int) -> str | None:
    """What to say when ``nproc`` local ranks and ``gpus`` GPUs leave the GPUs idle (gloo on the
    CPU, since NCCL needs a GPU per rank), or None."""
    if gpus == 0 or nproc <= gpus:
        return None
    return (
        f"{nproc} ranks and {gpus} GPU(s) on this machine: the ranks train on the CPU with gloo and the "
        f"GPU(s) stay idle. Use --nproc {gpus} to train on the GPU(s), or --virtual-ranks {nproc} "
        f"(with --nproc left out) for {nproc} ranks' semantics on one GPU"
    )


def setup(backend: str, timeout_s: float) -> DistContext:
    """Initialise the default process group (a collective that times out after ``timeout_s``)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if launched_by_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank, local_world = (
            int(os.environ.get("LOCAL_RANK", "0")),
            int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        )
        rendezvous: dict[str, Any] = {}  # the environment's MASTER_ADDR / MASTER_PORT
    else:
        rank, world, local_rank, local_world = 0, 1, 0, 1
        rendezvous = {"store": dist.HashStore()}
    backend = choose_backend(backend, local_world)
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        rank=rank,
        world_size=world,
        timeout=timeout,
        device_id=device if device.type == "cuda" else None,
        **rendezvous,
    )
    return DistContext(rank, world, local_rank, backend, device, local_world)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def check_equal_batches(expected: int, actual: int, device: torch.device) -> None:
    """Unequal batch counts silently corrupt DDP (ranks wait in different collectives)."""
    counts = torch.tensor([actual, -actual], dtype=torch.int64, device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    most, fewest = int(counts[0]), -int(counts[1])
    if most != fewest or actual != expected:
        raise RuntimeError(
            f"ranks have between {fewest} and {most} batches this epoch (this rank expected {expected}); "
            "unequal batch counts would corrupt DDP's gradient averaging"
        )


def now(device: torch.device) -> float:
    """``time.perf_counter()`` after the device finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
