"""What a checkpoint holds, under named keys, and the checks a resume makes.

One layout for both trainers: ``epoch`` and ``step`` (where training resumes), ``config``,
``model``, ``optimizer``, ``scaler`` (fp16 only), ``data`` (the data path's state: the sampler's
epoch and position, the plan's observed state, mid-epoch losses), ``rng`` (per rank) and
``partial`` (per rank, the epoch's running totals, mid-epoch only). Everything loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from reshuffle.config import ConfigError, RunConfig
from reshuffle.config.loading import to_mapping
from reshuffle.store.collectives import gather_ints
from reshuffle.train.checkpoint import CheckpointError, Checkpoints

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
} | {("dist", "timeout_s"), ("dist", "nproc"), ("shuffle", "store_dir")}  # elastic; missing stores restage


def checkpoints_of(run_dir: Path, config: RunConfig, resume: bool, ctx: Any = None) -> Checkpoints:
    """The run's checkpoints; a fresh run refuses a directory that already holds some.

    With ``ctx`` (collective): rank 0 writes them, and so does the first rank of every node whose
    ``run_dir`` is not rank 0's (a node-local ``log.dir``), so that every node keeps what it needs
    to resume."""
    checkpoints = Checkpoints(run_dir / "checkpoints", config.train.keep_checkpoints)
    if not resume and checkpoints.latest() is not None:
        raise ConfigError(
            f"{run_dir} already holds a run with checkpoints; continue it with --resume, or start a new "
            f"one under another name (name=...) or log.dir, or delete that directory"
        )
    shared = ctx is None or ctx.world_size == 1 or _shared(run_dir, ctx)  # every rank takes part
    checkpoints.writes = ctx is None or ctx.rank == 0 or (ctx.local_rank == 0 and not shared)
    return checkpoints


def _shared(run_dir: Path, ctx: Any) -> bool:
    """Whether this rank sees rank 0's ``run_dir`` (collective): rank 0 leaves a marker, the others look."""
    token = torch.tensor([secrets.randbits(62) if ctx.rank == 0 else 0], dtype=torch.int64, device=ctx.device)
    dist.broadcast(token, 0)
    marker = run_dir / f".marker-{int(token)}"
    if ctx.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        marker.touch()
    dist.barrier()
    seen = marker.exists()
    dist.barrier()
    if ctx.rank == 0:
        marker.unlink()
    return seen


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
    return check(Checkpoints.load(path), path, config)


def load_agreed(
    checkpoints: Checkpoints, config: RunConfig, rank: int, device: torch.device
) -> dict[str, Any] | None:
    """The checkpoint every rank resumes from (collective), agreed before anything changes a store:
    the newest any rank holds, sent by its holder to the ranks that lack it (a node-local
    ``log.dir``: a node that was replaced, or whose copy is older), which keep a copy."""
    path = checkpoints.latest()
    mine = Checkpoints.position(path) if path is not None else (-1, -1)
    table = gather_ints(list(mine), device, None)
    best = max(map(tuple, table.tolist()))
    if best == (-1, -1):
        log.info(
            "--resume: no rank holds a checkpoint in %s yet; starting from the beginning",
            checkpoints.directory,
        )
        return None
    source = min(r for r, row in enumerate(table.tolist()) if tuple(row) == best)
    name = Checkpoints.name(*best)
    try:
        payload: bytes | None = path.read_bytes() if rank == source and path is not None else None
    except OSError as error:
        payload = None
        log.error("--resume: cannot read %s: %s", path, error)
    payload = _broadcast_bytes(payload, source, device, sending=rank == source)
    if payload is None:  # on every rank: the holder could not read it
        raise CheckpointError(
            f"--resume: rank {source} could not read its checkpoint {name} (its log says why)"
        )
    if rank != source and mine != best and checkpoints.writes:
        checkpoints.write_bytes(payload, name)
        held = path.name if path is not None else "no checkpoint"
        log.info("--resume: rank %d had %s; received %s from rank %d", rank, held, name, source)
    return check(
        Checkpoints.load_bytes(payload, checkpoints.directory / name), checkpoints.directory / name, config
    )


def check(state: dict[str, Any], path: Path, config: RunConfig) -> dict[str, Any]:
    """``state`` if its settings match ``config`` where a resume must not change them."""
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


def _broadcast_bytes(payload: bytes | None, source: int, device: torch.device, sending: bool) -> bytes | None:
    """``payload`` from ``source`` on every rank; None everywhere when the source has none."""
    size = torch.tensor([len(payload) if payload is not None else -1], dtype=torch.int64, device=device)
    dist.broadcast(size, source)
    if int(size) < 0:
        return None
    if sending:
        assert payload is not None  # the sender holds the checkpoint
        buffer = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    else:
        buffer = torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.broadcast(buffer, source)
    return buffer.cpu().numpy().tobytes()


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


def partial_of(saved: dict[str, Any], rank: int, world_size: int) -> list[float]:
    """This rank's running totals of the epoch a mid-epoch checkpoint resumes. Written by another
    number of ranks (elastic): every rank takes the old ranks' step count and mean times, rank 0
    also their summed samples, losses, hits and label counts (the epoch's totals stay exact), and
    the order hash restarts (it covers the steps after the resize)."""
    totals = saved[PARTIAL]
    if len(totals) == world_size:
        return totals[rank]
    rows = np.asarray(totals, dtype=np.float64)  # EpochStats.to_numbers of each old rank
    merged = rows.mean(axis=0)
    counts = rows.sum(axis=0) if rank == 0 else np.zeros_like(merged)
    merged[0], merged[7] = rows[0, 0], 0.0  # steps (equal on every rank), order hash
    merged[1:4], merged[8:] = counts[1:4], counts[8:]  # samples, loss sum, hits; label counts
    return merged.tolist()


def set_rng(
    rng: dict[str, list[torch.Tensor]], rank: int, world_size: int, device: torch.device, *, step: int = 0
) -> None:
    """This rank's random streams from the checkpoint. With another number of ranks (elastic
    resume) the streams start afresh, seeded from the saved ones."""
    saved = len(rng["torch"])
    if saved != world_size:
        log.warning(
            "--resume with %d ranks instead of %d%s: every rank's random streams start afresh (dropout and "
            "augmentation draws differ from a run that kept %d ranks)", world_size, saved,
            f" mid-epoch (step {step})" if step else "", saved,
        )  # fmt: skip
        torch.manual_seed(int(rng["torch"][0].double().sum().item()) * 1_000_003 + rank)
        return
    torch.set_rng_state(rng["torch"][rank])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"][rank], device)
