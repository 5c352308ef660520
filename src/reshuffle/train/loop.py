"""The training loop: DDP under a shuffling strategy, with the paper's time breakdown.

One process per rank (``reshuffle run --nproc N``, ``torchrun``, or ``srun`` + ``torchrun``)::

    reshuffle run configs/smoke.yaml --nproc 2 shuffle.strategy=partial shuffle.fraction=0.1
    torchrun --nproc-per-node 4 -m reshuffle run configs/fashion-mnist.yaml

Per step, the time breakdown (seconds, summed over the epoch):

* ``io_s``: waiting for the next batch (DataLoader ``next``);
* ``fw_bw_s``: forward, loss and ``backward()``. With ``train.grad_sync=overlapped`` (DDP's
  default) the bucketed gradient all-reduce runs inside backward, overlapped with it, so this
  includes the part of the gradient exchange that compute did not hide;
* ``ge_wu_s``: gradient exchange and weight update after backward: the optimizer step, and with
  ``train.grad_sync=explicit`` one all-reduce of the flattened gradients (backward then runs
  under ``no_sync``), which separates the gradient exchange as the paper does.

Per epoch boundary (store mode): ``exchange_s`` is how long the background exchange took,
``exchange_exposed_s`` how long training waited for it: waiting and agreeing at the end of this
epoch, plus committing the previous exchange at its start. Both are empty in index mode.
On CUDA each timer synchronises the device, so the figures are real, at a small cost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import reshuffle
from reshuffle.config import (
    ConfigError,
    RunConfig,
    SystemConfig,
    dump_yaml,
    planner_options,
    system_config_path,
)
from reshuffle.data import SourceDataset, open_source, transform_for
from reshuffle.data.dataset import collate
from reshuffle.losses import LossTracker
from reshuffle.models import build_model
from reshuffle.models.sync_batchnorm import convert_sync_batchnorm
from reshuffle.plan import ShufflePlanner
from reshuffle.plan.quality import js_distance
from reshuffle.sampler import ShuffleSampler
from reshuffle.store import Exchanger, StoreDataset, new_exchange_group, stage
from reshuffle.train import distributed
from reshuffle.train.checkpoint import Checkpoints
from reshuffle.train.outputs import MetricsFiles, start_wandb
from reshuffle.train.progress import Progress
from reshuffle.train.recalibrate import recalibrate_batchnorm
from reshuffle.train.schedule import lr_at

log = logging.getLogger("reshuffle")


@dataclasses.dataclass
class EpochStats:
    """One rank's running totals for an epoch (saved in mid-epoch checkpoints)."""

    steps: int = 0
    samples: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    io_s: float = 0.0
    fw_bw_s: float = 0.0
    ge_wu_s: float = 0.0
    order_hash: int = 0  # rolling hash of the ids trained on, in order (52 bits: exact in float64)
    label_counts: list[int] = dataclasses.field(default_factory=list)

    def add_order(self, ids: list[int]) -> None:
        for sample in ids:
            self.order_hash = ((self.order_hash * 1_000_003) ^ sample) & 0x000F_FFFF_FFFF_FFFF

    def to_numbers(self) -> list[float]:
        """Every field as exact float64 values, for a tensor all-gather."""
        head = [
            self.steps,
            self.samples,
            self.loss_sum,
            self.correct,
            self.io_s,
            self.fw_bw_s,
            self.ge_wu_s,
            self.order_hash,
        ]
        return [float(v) for v in head] + [float(c) for c in self.label_counts]

    @classmethod
    def from_numbers(cls, values: list[float]) -> EpochStats:
        steps, samples, loss_sum, correct, io_s, fw_bw_s, ge_wu_s, order_hash, *labels = values
        return cls(
            int(steps),
            int(samples),
            loss_sum,
            int(correct),
            io_s,
            fw_bw_s,
            ge_wu_s,
            int(order_hash),
            [int(c) for c in labels],
        )


def train(config: RunConfig, system: SystemConfig, run_dir: Path, *, resume: bool = False) -> dict[str, Any]:
    """Train one rank of ``config``; every rank of the job calls this. Returns the run summary."""
    ctx = distributed.setup(system.backend, config.dist.timeout_s)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return _train(config, system, run_dir, ctx, resume)
    finally:
        torch.use_deterministic_algorithms(deterministic)  # leave the process as it was
        distributed.teardown()


def _train(
    config: RunConfig, system: SystemConfig, run_dir: Path, ctx: distributed.DistContext, resume: bool
) -> dict[str, Any]:
    started = time.time()
    _start_logging(run_dir, ctx.rank)
    _check_device_options(config, ctx)
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    train_cfg = config.train

    # ---- data and plan
    train_source = open_source(config.data, "train", system)
    test_source = open_source(config.data, "test", system)
    planner = ShufflePlanner(
        len(train_source),
        ctx.world_size,
        strategy=config.shuffle.strategy,
        fraction=config.shuffle.fraction,
        partition=config.shuffle.partition,
        labels=train_source.targets,
        seed=config.seed,
        drop_last=config.shuffle.drop_last,
        **planner_options(config.shuffle),
    )
    sampler = ShuffleSampler.from_planner(planner, ctx.rank)
    steps_per_epoch = math.ceil(planner.samples_per_rank / train_cfg.batch_size)
    dataset_labels = np.bincount(train_source.targets, minlength=train_source.num_classes)

    # ---- where training resumes
    checkpoints = Checkpoints(run_dir / "checkpoints", train_cfg.keep_checkpoints)
    if not resume and checkpoints.latest() is not None:
        raise ConfigError(
            f"{run_dir} already holds a run with checkpoints; continue it with --resume, or start a new "
            f"one under another name (name=...) or log.dir, or delete that directory"
        )
    state = _load_checkpoint(checkpoints, config) if resume else None
    start_epoch, start_step = (int(state["epoch"]), int(state["step"])) if state else (0, 0)
    if state:  # before staging: a loss-driven plan needs its observed state to say who holds what
        planner.load_state_dict(state["planner"])
    if start_epoch >= train_cfg.epochs:
        log.info("run %s already finished (%d epochs); nothing to do", config.name, train_cfg.epochs)
        return (
            json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
        )

    # ---- index mode reads the shared dataset; store mode the rank's node-local store
    train_transform = transform_for(config.data, "train", system)
    exchanger = None
    if config.shuffle.mode == "store":
        store_dir = Path(config.shuffle.store_dir or run_dir / "store")
        store, message = stage(
            store_dir, ctx.rank, train_source, planner, start_epoch, dataset=_dataset_identity(config)
        )
        log.info("%s", message)
        exchanger = Exchanger(
            store,
            planner,
            group=new_exchange_group(config.dist.timeout_s),
            device=ctx.device,
            chunk_bytes=int(config.shuffle.exchange_chunk_mb * 2**20),
            timeout_s=config.dist.timeout_s,
        )
        for action in exchanger.synchronize(start_epoch):
            log.info("%s", action)
        train_dataset = StoreDataset(store, train_source.decoder, train_transform)
    else:
        train_dataset = SourceDataset(train_source, train_transform)
    test_dataset = SourceDataset(test_source, transform_for(config.data, "test", system))
    test_loader = DataLoader(
        test_dataset,
        batch_size=train_cfg.batch_size * 2,
        sampler=list(range(ctx.rank, len(test_dataset), ctx.world_size)),
        num_workers=train_cfg.workers,
        collate_fn=collate,  # batches fetched whole by the datasets' __getitems__
        pin_memory=train_cfg.pin_memory,
    )

    # ---- model (identical initial weights on every rank; DDP checks and broadcasts them)
    torch.manual_seed(config.seed)
    model = build_model(config.model, train_source.shape, train_source.num_classes).to(ctx.device)
    if config.model.norm == "sync-batch" and ctx.world_size > 1:
        model = convert_sync_batchnorm(model, ctx.device)
    if train_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ddp = DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    forward = torch.compile(ddp, backend=train_cfg.compile_backend) if train_cfg.compile else ddp
    optimizer = _optimizer(model, config)
    scaler = torch.amp.GradScaler("cuda") if train_cfg.amp == "fp16" else None
    criterion = nn.CrossEntropyLoss(reduction="none", label_smoothing=train_cfg.label_smoothing)
    tracker = LossTracker(len(train_source))
    tracking = planner.strategy.uses_losses or train_cfg.track_losses
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ctx.rank == 0:  # the saved partial-epoch losses are every rank's, summed; counted once
            tracker.load_state_dict(state["losses"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        _set_rng(state["rng"], ctx)
        log.info("resumed from %s at epoch %d step %d", checkpoints.latest(), start_epoch, start_step)
    else:
        torch.manual_seed(_rank_seed(config.seed, ctx.rank))  # per-rank randomness (dropout)

    outputs = None
    hosts = _gather_hosts(ctx)
    if ctx.is_main:
        _write_run_files(run_dir, config, ctx, resume, hosts)
        wandb_run = None
        if config.log.wandb != "off":
            wandb_run = start_wandb(
                config.log.wandb, config.log.wandb_project, config.name, run_dir, _plain(config)
            )
        outputs = MetricsFiles(
            run_dir, resume_epoch=start_epoch, tensorboard=config.log.tensorboard, wandb=wandb_run
        )
    progress = Progress(config.log.progress, config.log.every_steps, enabled=ctx.is_main)

    # ---- epochs
    total_steps = start_epoch * steps_per_epoch + start_step
    sample_bytes = _mean_sample_bytes(train_source)
    commit_s = 0.0  # the previous boundary's commit, counted as exposed in this epoch's row
    footprint = Footprint(planner, start_epoch, [ctx.rank])
    stopped = False
    last_row: dict[str, Any] = {}
    for epoch in range(start_epoch, train_cfg.epochs):
        epoch_started = time.perf_counter()
        first_step = start_step if epoch == start_epoch else 0
        stats = (
            EpochStats.from_numbers(state["partial"][ctx.rank]) if (state and first_step) else EpochStats()
        )
        if not stats.label_counts:
            stats.label_counts = [0] * train_source.num_classes
        # the next epoch's samples move while this one trains, unless where they go depends on
        # this epoch's losses (an importance re-partition): then it runs at the boundary
        deferred = exchanger is not None and planner.strategy.needs_losses_of(epoch)
        if exchanger is not None and epoch + 1 < train_cfg.epochs and not deferred:
            exchanger.start(epoch)
        sampler.set_epoch(epoch)
        if first_step:
            position = sampler.state_dict()
            position[ShuffleSampler.STATE_POSITION] = first_step * train_cfg.batch_size
            sampler.load_state_dict(position)
        train_dataset.set_epoch(epoch, seed=config.seed)
        loader = DataLoader(
            train_dataset,
            batch_size=train_cfg.batch_size,
            sampler=sampler,
            num_workers=train_cfg.workers,
            collate_fn=collate,
            pin_memory=train_cfg.pin_memory,
            generator=torch.Generator().manual_seed(_rank_seed(config.seed, ctx.rank) + epoch),
        )
        _check_equal_batches(steps_per_epoch - first_step, len(loader), ctx)
        model.train()
        progress.start(epoch, steps_per_epoch, first_step)
        step_rows: list[dict[str, Any]] = []
        batches = iter(loader)
        for step in range(first_step, steps_per_epoch):
            tick = _now(ctx)
            images, labels, ids = next(batches)
            images = images.to(ctx.device, non_blocking=True)
            labels = labels.to(ctx.device, non_blocking=True)
            if train_cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            loaded = _now(ctx)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(total_steps, steps_per_epoch, train_cfg, ctx.world_size)
            with torch.autocast(
                ctx.device.type, dtype=_amp_dtype(train_cfg.amp), enabled=train_cfg.amp != "off"
            ):
                logits, per_sample = _forward_loss(
                    forward, criterion, images, labels, config, epoch, step, ctx.rank
                )
            loss = per_sample.mean()
            if train_cfg.grad_sync == "explicit":
                with ddp.no_sync():
                    _backward(loss, scaler)
            else:
                _backward(loss, scaler)
            computed = _now(ctx)
            if train_cfg.grad_sync == "explicit":
                _all_reduce_gradients(model, ctx.world_size)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            updated = _now(ctx)

            stats.io_s += loaded - tick
            stats.fw_bw_s += computed - loaded
            stats.ge_wu_s += updated - computed
            stats.steps += 1
            stats.samples += labels.shape[0]
            stats.loss_sum += float(per_sample.detach().float().sum())
            stats.correct += int((logits.detach().argmax(1) == labels).sum())
            counts = torch.bincount(labels.cpu(), minlength=train_source.num_classes)
            stats.label_counts = [a + int(b) for a, b in zip(stats.label_counts, counts, strict=True)]
            stats.add_order(ids.tolist())
            if tracking:
                tracker.add(ids, per_sample.detach())
            if config.log.step_losses:
                mean_loss = loss.detach().float().clone()
                dist.all_reduce(mean_loss)
                step_rows.append({"epoch": epoch, "step": step, "loss": float(mean_loss) / ctx.world_size})
            progress.step(step, float(loss.detach()))
            total_steps += 1

            reached_limit = bool(train_cfg.max_steps) and total_steps >= train_cfg.max_steps
            due = bool(train_cfg.checkpoint_steps) and (step + 1) % train_cfg.checkpoint_steps == 0
            if (reached_limit or due) and step + 1 < steps_per_epoch:
                _save(
                    checkpoints,
                    ctx,
                    epoch,
                    step + 1,
                    model,
                    optimizer,
                    planner,
                    tracker,
                    scaler,
                    config,
                    stats,
                )
            if reached_limit:
                stopped = True
                break
        progress.finish()
        if stopped:
            if exchanger is not None and epoch + 1 < train_cfg.epochs:
                exchanger.wait()  # leave nothing half-done; recovery discards the prepared state
            log.info(
                "stopped after train.max_steps=%d steps (a checkpoint holds the position)",
                train_cfg.max_steps,
            )
            break
        train_time = time.perf_counter() - epoch_started

        # ---- epoch boundary: wait for the exchange, recalibrate, evaluate
        exchange_s, exposed_s, sent, received = math.nan, math.nan, 0, 0
        boundary = time.perf_counter()
        if deferred and epoch + 1 < train_cfg.epochs:
            _observe_losses(planner, tracker, epoch, ctx)
            exchanger.start(epoch)
        if exchanger is not None:
            exchange_s = 0.0
            if epoch + 1 < train_cfg.epochs:
                exchange_stats = exchanger.wait()
                exchanger.agree()
                exchange_s, sent, received = (
                    exchange_stats.seconds,
                    exchange_stats.bytes_sent,
                    exchange_stats.bytes_received,
                )
            exposed_s = time.perf_counter() - boundary + commit_s
        if tracking and not (deferred and epoch + 1 < train_cfg.epochs):
            _observe_losses(planner, tracker, epoch, ctx)
        moved = (
            sum(ids.size for ids in planner.plan(epoch).sends(ctx.rank).values())
            if epoch + 1 < train_cfg.epochs
            else 0
        )
        if train_cfg.bn_recalibrate:
            own = planner.plan(epoch).indices(ctx.rank)[
                : train_cfg.bn_recalibrate_batches * train_cfg.batch_size
            ]
            recalibrate_batchnorm(
                model,
                (
                    batch[0]
                    for batch in DataLoader(
                        train_dataset,
                        batch_size=train_cfg.batch_size,
                        sampler=own.tolist(),
                        collate_fn=collate,
                    )
                ),
                ctx.device,
            )
        tracker.reset()
        epoch_s = time.perf_counter() - epoch_started
        eval_started = time.perf_counter()
        test = _evaluate(model, test_loader, criterion, ctx, train_cfg)
        eval_s = time.perf_counter() - eval_started

        churn, coverage, storage = footprint.update(planner, epoch, ctx.rank, train_cfg.epochs)
        rank_values = [
            *stats.to_numbers()[:7],
            exchange_s, exposed_s, sent, received, js_distance(stats.label_counts, dataset_labels),
            float(stats.order_hash), epoch_s, train_time, moved, churn, coverage, storage,
        ]  # fmt: skip
        gathered = _gather(rank_values, ctx)
        last_row = _epoch_row(epoch, gathered, test, eval_s, optimizer, ctx, sample_bytes)
        if outputs is not None:
            outputs.write(last_row, _rank_rows(epoch, gathered, stats), step_rows)
            log.info("%s", _epoch_line(last_row))

        # ---- checkpoint (before the store commits: a store cannot go back, see rank_store)
        last_epoch = epoch + 1 == train_cfg.epochs
        store_mode = exchanger is not None
        if (
            store_mode
            or last_epoch
            or (train_cfg.checkpoint_every and (epoch + 1) % train_cfg.checkpoint_every == 0)
        ):
            _save(checkpoints, ctx, epoch + 1, 0, model, optimizer, planner, tracker, scaler, config, None)
        if exchanger is not None and not last_epoch:
            committing = time.perf_counter()
            exchanger.commit()
            commit_s = time.perf_counter() - committing
        state = None
    if exchanger is not None:
        exchanger.settle()  # the last commit's upkeep (freeing dead space) ends with the job

    summary = {
        "name": config.name,
        "status": "stopped" if stopped else "completed",
        "epochs": train_cfg.epochs,
        "world_size": ctx.world_size,
        "wall_s": time.time() - started,
        "final": last_row,
    }
    if ctx.is_main:
        if outputs is not None:
            outputs.close()
        if not stopped:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
    return summary


# --------------------------------------------------------------------------- one step


def _forward_loss(forward, criterion, images, labels, config: RunConfig, epoch: int, step: int, rank: int):
    """Logits and per-sample losses; with mixup, a batch mixed with its own permutation, drawn
    from a generator keyed by (seed, epoch, step, rank) so that resumes and virtual ranks agree."""
    alpha = config.train.mixup_alpha
    if alpha <= 0:
        logits = forward(images)
        return logits, criterion(logits.float(), labels)
    weight, order = _mixup_draw(config, epoch, step, rank, images.shape[0])
    order = order.to(images.device)
    logits = forward(weight * images + (1 - weight) * images[order])
    per_sample = weight * criterion(logits.float(), labels) + (1 - weight) * criterion(
        logits.float(), labels[order]
    )
    return logits, per_sample


def _mixup_draw(config: RunConfig, epoch: int, step: int, rank: int, size: int) -> tuple[float, torch.Tensor]:
    """Rank ``rank``'s mixup weight and partner order at (epoch, step), from their own key."""
    generator = torch.Generator().manual_seed(
        _rank_seed(config.seed, rank) * 1_000_003 + epoch * 100_003 + step
    )
    weight = _beta(config.train.mixup_alpha, generator)
    return weight, torch.randperm(size, generator=generator)


def _beta(alpha: float, generator: torch.Generator) -> float:
    """A Beta(alpha, alpha) draw from ``generator`` (as the ratio of two Gamma draws)."""
    a = torch._standard_gamma(torch.tensor([alpha], dtype=torch.float64), generator=generator)
    b = torch._standard_gamma(torch.tensor([alpha], dtype=torch.float64), generator=generator)
    return float(a / (a + b))


def _backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _tensors(value: Any) -> Any:
    """``value`` with every numpy array turned into a tensor (``torch.load(weights_only=True)``
    refuses numpy arrays; strategies read tensors back with ``np.asarray``)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value))  # a writable copy
    if isinstance(value, dict):
        return {key: _tensors(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_tensors(item) for item in value)
    return value


def _observe_losses(
    planner: ShufflePlanner, tracker: LossTracker, epoch: int, ctx: distributed.DistContext
) -> None:
    """Sum every rank's per-sample losses (one N-length collective) and hand them to the planner."""
    tracker.reduce(device=ctx.device)
    if planner.strategy.uses_losses:
        planner.observe(epoch, *(t.numpy() for t in tracker.mean()))


def _all_reduce_gradients(model: nn.Module, world_size: int) -> None:
    """``train.grad_sync=explicit``: one all-reduce of every gradient, flattened, then the mean."""
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    if not gradients or world_size == 1:
        return
    flat = torch.cat([g.flatten() for g in gradients])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for gradient in gradients:
        gradient.copy_(flat[offset : offset + gradient.numel()].view_as(gradient))
        offset += gradient.numel()


@torch.no_grad()
def _evaluate(
    model: nn.Module, loader: DataLoader, criterion: nn.Module, ctx: distributed.DistContext, train_cfg
) -> dict[str, float]:
    """Test loss, top-1 and top-5 over the whole test set (each rank a shard), with rank 0's
    BatchNorm running statistics, as DDP would use them."""
    for buffer in model.buffers():
        dist.broadcast(buffer, 0)
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)
    for images, labels, _ in loader:
        images, labels = images.to(ctx.device), labels.to(ctx.device)
        if train_cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(ctx.device.type, dtype=_amp_dtype(train_cfg.amp), enabled=train_cfg.amp != "off"):
            logits = model(images).float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        totals += torch.tensor([
            float(criterion(logits, labels).sum()), float((top5[:, 0] == labels).sum()),
            float((top5 == labels[:, None]).any(1).sum()), float(labels.shape[0]),
        ], dtype=torch.float64)  # fmt: skip
    totals = totals.to(ctx.device)
    dist.all_reduce(totals)
    loss, top1, top5, count = totals.tolist()
    model.train()
    return {"test_loss": loss / count, "test_acc": top1 / count, "test_top5": top5 / count}


# --------------------------------------------------------------------------- rows and files


_FIELDS = [
    "steps", "samples", "loss_sum", "correct", "io_s", "fw_bw_s", "ge_wu_s",
    "exchange_s", "exchange_exposed_s", "bytes_sent", "bytes_received", "label_js",
    "order_hash", "epoch_s", "train_s", "moved", "churn", "coverage", "storage",
]  # fmt: skip


def _gather(values: list[float], ctx: distributed.DistContext) -> list[dict[str, float]]:
    """Every rank's values (a float64 tensor all-gather, no pickling)."""
    mine = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    everyone = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(everyone, mine)
    return [dict(zip(_FIELDS, tensor.tolist(), strict=True)) for tensor in everyone]


def _epoch_line(row: dict[str, Any]) -> str:
    exposed = row["exchange_exposed_s"]
    return (
        f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}, "
        f"test acc {row['test_acc']:.4f}, {row['epoch_s']:.1f} s (io {row['io_s']:.2f}, "
        f"fw+bw {row['fw_bw_s']:.2f}, ge+wu {row['ge_wu_s']:.2f}, "
        f"exposed exchange {'-' if math.isnan(exposed) else f'{exposed:.2f}'})"
    )


class Footprint:
    """Per rank and epoch, from the plan: churn (share of the rank's holdings new this epoch),
    coverage (share of the dataset it has trained on so far) and peak storage in samples
    (holdings plus the samples arriving for the next epoch: what a store-mode rank keeps)."""

    def __init__(self, planner: ShufflePlanner, start_epoch: int, ranks: list[int]) -> None:
        self.seen = {rank: np.zeros(planner.num_samples, dtype=bool) for rank in ranks}
        self.known = True
        try:  # a resumed run replays the plans before it (a loss-driven plan may not have them)
            for epoch in range(start_epoch):
                for rank in ranks:
                    self.seen[rank][planner.plan(epoch).indices(rank)] = True
        except ValueError:
            self.known = False

    def update(
        self, planner: ShufflePlanner, epoch: int, rank: int, epochs: int
    ) -> tuple[float, float, float]:
        plan = planner.plan(epoch)
        held = plan.holdings(rank)
        self.seen[rank][plan.indices(rank)] = True
        coverage = float(self.seen[rank].mean()) if self.known else math.nan
        churn = math.nan
        if epoch > 0:
            with contextlib.suppress(ValueError):  # that plan may be gone (a resumed loss-driven one)
                churn = np.setdiff1d(held, planner.plan(epoch - 1).holdings(rank)).size / held.size
        arriving = sum(ids.size for ids in plan.receives(rank).values()) if epoch + 1 < epochs else 0
        return churn, coverage, float(held.size + arriving)


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _epoch_row(epoch, ranks, test, eval_s, optimizer, ctx, sample_bytes: float) -> dict[str, Any]:
    samples = sum(r["samples"] for r in ranks)
    train_s = max(r["train_s"] for r in ranks)
    return {
        "epoch": epoch,
        "train_loss": sum(r["loss_sum"] for r in ranks) / samples,
        "train_acc": sum(r["correct"] for r in ranks) / samples,
        **test,
        "epoch_s": max(r["epoch_s"] for r in ranks),
        "io_s": _nanmean([r["io_s"] for r in ranks]),
        "io_max_s": max(r["io_s"] for r in ranks),
        "fw_bw_s": _nanmean([r["fw_bw_s"] for r in ranks]),
        "ge_wu_s": _nanmean([r["ge_wu_s"] for r in ranks]),
        "exchange_s": _nanmean([r["exchange_s"] for r in ranks]),
        "exchange_exposed_s": _nanmean([r["exchange_exposed_s"] for r in ranks]),
        "exchange_exposed_max_s": max(r["exchange_exposed_s"] for r in ranks),
        "bytes_exchanged": int(sum(r["bytes_sent"] for r in ranks)),
        "samples_moved": int(sum(r["moved"] for r in ranks)),
        "bytes_planned": int(sum(r["moved"] for r in ranks) * sample_bytes),
        "lr": optimizer.param_groups[0]["lr"],
        "samples_per_s": samples / train_s if train_s else math.nan,
        "steps": int(ranks[0]["steps"]),
        "samples": int(samples),
        "eval_s": eval_s,
        "label_js": _nanmean([r["label_js"] for r in ranks]),
        "label_js_max": max(r["label_js"] for r in ranks),
        "churn": _nanmean([r["churn"] for r in ranks]),
        "coverage": _nanmean([r["coverage"] for r in ranks]),
        "storage_bytes": int(max(r["storage"] for r in ranks) * sample_bytes),
        "world_size": ctx.world_size,
        "virtual": 0,
    }


def _rank_rows(epoch: int, ranks: list[dict[str, float]], stats: EpochStats) -> list[dict[str, Any]]:
    return [
        {
            "epoch": epoch,
            "rank": rank,
            "steps": int(r["steps"]),
            "samples": int(r["samples"]),
            "train_loss": r["loss_sum"] / max(r["samples"], 1),
            "train_acc": r["correct"] / max(r["samples"], 1),
            "io_s": r["io_s"],
            "fw_bw_s": r["fw_bw_s"],
            "ge_wu_s": r["ge_wu_s"],
            "exchange_s": r["exchange_s"],
            "exchange_exposed_s": r["exchange_exposed_s"],
            "bytes_sent": int(r["bytes_sent"]),
            "bytes_received": int(r["bytes_received"]),
            "label_js": r["label_js"],
            "order_sha": f"{int(r['order_hash']):013x}",
        }
        for rank, r in enumerate(ranks)
    ]


def _write_run_files(
    run_dir: Path, config: RunConfig, ctx: distributed.DistContext, resume: bool, hosts: list[str]
) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(config))
    environment = {
        "reshuffle": reshuffle.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "world_size": ctx.world_size,
        "backend": ctx.backend,
        "device": str(ctx.device),
        "cuda_devices": torch.cuda.device_count(),
        "hosts": hosts,
        "torch_threads": torch.get_num_threads(),
        "system_config": str(system_config_path() or "built-in defaults"),
        "resumed": resume,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (run_dir / "env.json").write_text(json.dumps(environment, indent=1) + "\n")


def _gather_hosts(ctx: distributed.DistContext) -> list[str]:
    name = socket.gethostname().encode()[:255]
    mine = torch.zeros(256, dtype=torch.uint8, device=ctx.device)
    mine[: len(name)] = torch.tensor(list(name), dtype=torch.uint8)
    everyone = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(everyone, mine)
    return [bytes(t.cpu().tolist()).rstrip(b"\0").decode(errors="replace") for t in everyone]


def _plain(config: RunConfig) -> dict[str, Any]:
    from reshuffle.config.loading import to_mapping

    return to_mapping(config)


def _dataset_identity(config: RunConfig) -> dict[str, Any]:
    return {
        "name": config.data.name,
        "train_limit": config.data.train_limit,
        "synthetic": _plain(config)["data"]["synthetic"],
    }


# --------------------------------------------------------------------------- checkpoints


def _save(
    checkpoints,
    ctx,
    epoch,
    step,
    model,
    optimizer,
    planner,
    tracker,
    scaler,
    config,
    partial: EpochStats | None,
) -> None:
    """Every rank contributes its RNG state and epoch totals; rank 0 writes (collective)."""
    rng = _gather_rng(ctx)
    # mid-epoch, each rank has tracked only its own losses so far: save their sum (collective)
    losses = tracker.summed(ctx.device) if partial is not None else tracker.state_dict()
    partials = None
    if partial is not None:
        mine = torch.tensor(partial.to_numbers(), dtype=torch.float64, device=ctx.device)
        everyone = [torch.empty_like(mine) for _ in range(ctx.world_size)]
        dist.all_gather(everyone, mine)
        partials = [t.cpu().tolist() for t in everyone]
    if ctx.is_main:
        state = {
            "epoch": epoch,
            "step": step,
            "config": _plain(config),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "planner": _tensors(planner.state_dict()),  # numpy arrays as tensors: weights_only loads
            "losses": losses,
            "rng": rng,
            "partial": partials,  # per rank: the epoch's totals so far (mid-epoch checkpoints)
        }
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        checkpoints.save(state, epoch, step)
    dist.barrier()


def _load_checkpoint(checkpoints: Checkpoints, config: RunConfig) -> dict[str, Any] | None:
    path = checkpoints.latest()
    if path is None:
        log.info("--resume: no checkpoint in %s yet; starting from the beginning", checkpoints.directory)
        return None
    state = Checkpoints.load(path)
    saved = state["config"]
    current = _plain(config)
    # What may change on a resume: how long to train and how to log; nothing that changes the run.
    free = {
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
    changed = [
        f"{section}.{key}"
        for section, values in current.items()
        if isinstance(values, dict)
        for key, value in values.items()
        if section != "log" and (section, key) not in free and saved.get(section, {}).get(key) != value
    ] + [key for key in ("seed",) if saved.get(key) != current.get(key)]
    if changed:
        raise ConfigError(
            f"--resume: the checkpoint {path} was written with different settings for {', '.join(changed)}; "
            "resume with the same config, or start a new run (another name or log.dir)"
        )
    return state


def _gather_rng(ctx: distributed.DistContext) -> dict[str, list[torch.Tensor]]:
    states = {"torch": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(ctx.device)
    gathered: dict[str, list[torch.Tensor]] = {}
    for key, mine in states.items():
        mine = mine.to(ctx.device)
        everyone = [torch.empty_like(mine) for _ in range(ctx.world_size)]
        dist.all_gather(everyone, mine)
        gathered[key] = [t.cpu() for t in everyone]
    return gathered


def _set_rng(rng: dict[str, list[torch.Tensor]], ctx: distributed.DistContext) -> None:
    if len(rng["torch"]) != ctx.world_size:
        raise ConfigError(
            f"--resume: the checkpoint holds {len(rng['torch'])} ranks' state; this job has {ctx.world_size}"
        )
    torch.set_rng_state(rng["torch"][ctx.rank])
    if "cuda" in rng and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"][ctx.rank], ctx.device)


# --------------------------------------------------------------------------- small things


def _optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    kinds = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    try:
        return kinds[config.train.optimizer](
            model.parameters(), lr=config.train.lr, **config.train.optimizer_kwargs
        )
    except TypeError as error:
        raise ConfigError(f"train.optimizer_kwargs: {error}") from None


def _check_device_options(config: RunConfig, ctx: distributed.DistContext) -> None:
    if config.train.amp == "fp16" and ctx.device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs a CUDA device; use train.amp=bf16 on CPU (or off)")
    if config.train.pin_memory and ctx.device.type != "cuda":
        log.info("train.pin_memory has no effect without CUDA")


def _check_equal_batches(expected: int, actual: int, ctx: distributed.DistContext) -> None:
    """Unequal batch counts silently corrupt DDP (ranks wait in different collectives)."""
    counts = torch.tensor([actual, -actual], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    most, fewest = int(counts[0]), -int(counts[1])
    if most != fewest or actual != expected:
        raise RuntimeError(
            f"ranks have between {fewest} and {most} batches this epoch (this rank expected {expected}); "
            "unequal batch counts would corrupt DDP's gradient averaging"
        )


def _mean_sample_bytes(source) -> float:
    """Bytes per stored sample: exact for in-memory datasets, a 64-sample mean for files."""
    fixed = getattr(source, "sample_bytes", None)
    if fixed is not None:
        return float(fixed)
    picks = np.random.default_rng(0).choice(len(source), size=min(64, len(source)), replace=False)
    return float(np.mean([len(source.raw(int(i))) for i in picks]))


def _amp_dtype(amp: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp, torch.float32)


def _rank_seed(seed: int, rank: int) -> int:
    return (seed * 1_000_003 + rank * 7919 + 17) % (2**31 - 1)


def _now(ctx: distributed.DistContext) -> float:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    return time.perf_counter()


def _start_logging(run_dir: Path, rank: int) -> None:
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
