"""What a checkpoint holds, under named keys, and the checks a resume makes.

One layout for both trainers: ``epoch`` and ``step`` (where training resumes), ``config``,
``model``, ``optimizer``, ``scaler`` (fp16 only), ``data`` (the data path's state: the sampler's
epoch and position, the plan's observed state, mid-epoch losses), ``rng`` (per rank) and
``partial`` (per rank, the epoch's running totals, mid-epoch only). Everything loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from reshuffle.config import ConfigError, RunConfig
from reshuffle.config.loading import to_mapping
from reshuffle.train.checkpoint import Checkpoints

log = logging.getLogger("reshuffle")

EPOCH, STEP, CONFIG, MODEL, OPTIMIZER, SCALER = "epoch", "step", "config", "model", "optimizer", "scaler"
DATA, RNG, PARTIAL = "data", "rng", "partial"

# What may change on a resume: how long to train and how to log; nothing that changes the run.
FREE_ON_RESUME = {
    ("train", key)
    for key in (
        "epochs",
        "max_steps",
        "checkpoint_every",
        "checkpoint_steps",
        "keep_checkpoints",
        "workers",
        "pin_memory",
    )
} | {("dist", "timeout_s")}


def checkpoints_of(run_dir: Path, config: RunConfig, resume: bool) -> Checkpoints:
    """The run's checkpoints; a fresh run refuses a directory that already holds some."""
    checkpoints = Checkpoints(run_dir / "checkpoints", config.train.keep_checkpoints)
    if not resume and checkpoints.latest() is not None:
        raise ConfigError(
            f"{run_dir} already holds a run with checkpoints; continue it with --resume, or start a new "
            f"one under another name (name=...) or log.dir, or delete that directory"
        )
    return checkpoints


def build(
    epoch: int, step: int, config: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None, data: dict[str, Any], rng: dict[str, list[torch.Tensor]],
    partial: list[list[float]] | None,
) -> dict[str, Any]:  # fmt: skip
    state = {
        EPOCH: epoch, STEP: step, CONFIG: to_mapping(config), MODEL: model.state_dict(),
        OPTIMIZER: optimizer.state_dict(), DATA: data, RNG: rng, PARTIAL: partial,
    }  # fmt: skip
    if scaler is not None:
        state[SCALER] = scaler.state_dict()
    return state


def restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, scaler) -> None:
    """Model, optimizer and scaler from a checkpoint."""
    model.load_state_dict(state[MODEL])
    optimizer.load_state_dict(state[OPTIMIZER])
    if scaler is not None and SCALER in state:
        scaler.load_state_dict(state[SCALER])


def load(checkpoints: Checkpoints, config: RunConfig) -> dict[str, Any] | None:
    """The newest checkpoint, if its settings match ``config`` where a resume must not change them."""
    path = checkpoints.latest()
    if path is None:
        log.info("--resume: no checkpoint in %s yet; starting from the beginning", checkpoints.directory)
        return None
    state = Checkpoints.load(path)
    if DATA not in state:
        raise ConfigError(
            f"--resume: {path} was written by an older reshuffle; start a new run (another name)"
        )
    saved, current = state[CONFIG], to_mapping(config)
    changed = [
        f"{section}.{key}"
        for section, values in current.items()
        if isinstance(values, dict)
        for key, value in values.items()
        if section != "log"
        and (section, key) not in FREE_ON_RESUME
        and saved.get(section, {}).get(key) != value
    ] + [key for key in ("seed",) if saved.get(key) != current.get(key)]
    if changed:
        raise ConfigError(
            f"--resume: the checkpoint {path} was written with different settings for {', '.join(changed)}; "
            "resume with the same config, or start a new run (another name or log.dir)"
        )
    log.info("resuming from %s at epoch %d step %d", path, state[EPOCH], state[STEP])
    return state


def gather_rng(device: torch.device, world_size: int) -> dict[str, list[torch.Tensor]]:
    """Every rank's RNG states (collective), so each rank resumes its own streams."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    gathered: dict[str, list[torch.Tensor]] = {}
    for key, mine in states.items():
        mine = mine.to(device)
        everyone = [torch.empty_like(mine) for _ in range(world_size)]
        dist.all_gather(everyone, mine)
        gathered[key] = [t.cpu() for t in everyone]
    return gathered


def set_rng(rng: dict[str, list[torch.Tensor]], rank: int, world_size: int, device: torch.device) -> None:
    if len(rng["torch"]) != world_size:
        raise ConfigError(
            f"--resume: the checkpoint holds {len(rng['torch'])} ranks' state; this job has {world_size}"
        )
    torch.set_rng_state(rng["torch"][rank])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"][rank], device)
