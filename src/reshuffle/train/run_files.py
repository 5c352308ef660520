"""The files a run writes besides metrics: per-rank logs, ``config.yaml`` and ``env.json``."""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import reshuffle
from reshuffle import memory
from reshuffle.config import RunConfig, SystemConfig, dump_yaml
from reshuffle.config.loading import to_mapping
from reshuffle.plan.planner import plain
from reshuffle.train.outputs import MetricsFiles, start_wandb

log = logging.getLogger("reshuffle")


def start_logging(run_dir: Path, rank: int) -> None:
    """``logs/rank-<r>.log`` for every rank, and the console for rank 0."""
    for handler in list(log.handlers):  # a previous run in this process
        log.removeHandler(handler)
        handler.close()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "logs" / f"rank-{rank}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s rank " + str(rank) + " %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    if rank == 0:
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(console)
    log.info("rank %d: pid %d on %s", rank, os.getpid(), socket.gethostname())


def log_failure(error: BaseException) -> None:
    """The failing traceback into this rank's log file (not the console: the launcher prints the
    one-line cause and points at this file)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "failed: %s", (error,), None)
    record.exc_info = (type(error), error, error.__traceback__)
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def write_run_files(
    run_dir: Path, config: RunConfig, system: SystemConfig, *, world_size: int, backend: str,
    device: torch.device, resume: bool, hosts: list[str], **extra: Any,
) -> None:  # fmt: skip
    """``config.yaml`` (the config as run) and ``env.json`` (versions, devices, hosts)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(config))
    environment = {
        "reshuffle": reshuffle.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "world_size": world_size,
        "backend": backend,
        "device": str(device),
        "cuda_devices": torch.cuda.device_count(),
        "hosts": hosts,
        "torch_threads": torch.get_num_threads(),
        "freed_memory_kept": memory.in_effect(),  # train.keep_freed_memory
        "system_config": system.origin,
        "resumed": resume,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
    (run_dir / "env.json").write_text(json.dumps(environment, indent=1) + "\n")


def gather_hosts(device: torch.device, world_size: int) -> list[str]:
    """Every rank's host name (collective)."""
    name = socket.gethostname().encode()[:255]
    mine = torch.zeros(256, dtype=torch.uint8, device=device)
    mine[: len(name)] = torch.tensor(list(name), dtype=torch.uint8)
    everyone = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(everyone, mine)
    return [bytes(t.cpu().tolist()).rstrip(b"\0").decode(errors="replace") for t in everyone]


def summary(config: RunConfig, world_size: int, last_row: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """The run summary: ``completed`` once the last epoch's row exists, ``stopped`` before."""
    completed = last_row.get("epoch") == config.train.epochs - 1
    return {
        "name": config.name,
        "status": "completed" if completed else "stopped",
        "epochs": config.train.epochs,
        "world_size": world_size,
        "wall_s": wall_s,
        "final": last_row,
    }


def finish(
    run_dir: Path, config: RunConfig, world_size: int, last_row: dict[str, Any], wall_s: float,
    outputs: MetricsFiles | None,
) -> dict[str, Any]:  # fmt: skip
    """Close the metrics files (rank 0) and write ``summary.json`` once every epoch ran."""
    result = summary(config, world_size, last_row, wall_s)
    if outputs is not None:
        outputs.close()
        if result["status"] == "completed":
            write_summary(run_dir, result)
    return result


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """``summary.json``: valid JSON, with a figure that does not apply (NaN) as null."""
    text = json.dumps(plain(summary), indent=1, default=lambda value: plain(float(value)), allow_nan=False)
    (run_dir / "summary.json").write_text(text + "\n")


def saved_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def dataset_identity(config: RunConfig) -> dict[str, Any]:
    """What a store records as its dataset: a store reopens only for the same data settings."""
    return {
        "name": config.data.name,
        "train_limit": config.data.train_limit,
        "synthetic": to_mapping(config)["data"]["synthetic"],
    }


def open_outputs(
    run_dir: Path, config: RunConfig, system: SystemConfig, ctx: Any, resume: bool, start_epoch: int
) -> MetricsFiles | None:
    """Run files and metrics writers on rank 0 (the host list is gathered from every rank)."""
    hosts = gather_hosts(ctx.device, ctx.world_size)
    if not ctx.is_main:
        return None
    write_run_files(
        run_dir, config, system, world_size=ctx.world_size, backend=ctx.backend, device=ctx.device,
        resume=resume, hosts=hosts,
    )  # fmt: skip
    wandb = None
    if config.log.wandb != "off":
        plain = to_mapping(config)
        wandb = start_wandb(config.log.wandb, config.log.wandb_project, config.name, run_dir, plain)
    return MetricsFiles(run_dir, resume_epoch=start_epoch, tensorboard=config.log.tensorboard, wandb=wandb)
