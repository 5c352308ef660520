"""The training loop: DDP under a shuffling strategy, with the paper's time breakdown.

One process per rank (``reshuffle run --nproc N``, ``torchrun``, or ``srun`` + ``torchrun``)::

    reshuffle run configs/smoke.yaml --nproc 2 shuffle.strategy=partial shuffle.fraction=0.1

The data comes from :class:`~reshuffle.ShuffledData`, the public object any loop drives: this loop
is its first client. docs/training.md says how each time-breakdown column is measured.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from reshuffle import heartbeat
from reshuffle.config import RunConfig, SystemConfig
from reshuffle.data.dataset import collate
from reshuffle.data.source import SampleSource
from reshuffle.ddp import settle_buckets
from reshuffle.memory import keep_freed_memory
from reshuffle.models import build_model
from reshuffle.models.sync_batchnorm import sync_ranks
from reshuffle.plan.quality import js_distance
from reshuffle.sampler import ShuffleSampler
from reshuffle.shuffled import ShuffledData
from reshuffle.train import distributed, inputs, metrics, run_files, state, step
from reshuffle.train.checkpoint import Checkpoints
from reshuffle.train.epochs import run_epochs
from reshuffle.train.outputs import MetricsFiles
from reshuffle.train.progress import Progress
from reshuffle.train.recalibrate import recalibrate_batchnorm
from reshuffle.train.schedule import lr_at
from reshuffle.train.virtual import train_virtual

log = run_files.log


def train(config: RunConfig, system: SystemConfig, run_dir: Path, *, resume: bool = False) -> dict[str, Any]:
    """Train one rank of ``config``; every rank of the job calls this (with
    ``dist.virtual_ranks``, this one process trains them all). Returns the run summary."""
    if config.dist.virtual_ranks:
        return train_virtual(config, system, run_dir, resume=resume)
    ctx = distributed.setup(system.backend, config.dist.timeout_s)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with (
            heartbeat.watch(ctx.rank, ctx.world_size, config.dist.timeout_s),
            keep_freed_memory(step.keeps_freed_memory(config, ctx.device)),
        ):
            return _train(config, system, run_dir, ctx, resume)
    except BaseException as error:
        run_files.log_failure(error)
        raise
    finally:
        torch.use_deterministic_algorithms(deterministic)  # leave the process as it was
        distributed.teardown()


def _train(
    config: RunConfig, system: SystemConfig, run_dir: Path, ctx: distributed.DistContext, resume: bool
) -> dict[str, Any]:
    started = time.time()
    run_files.start_logging(run_dir, ctx.rank)
    step.check_device_options(config, ctx.device)
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    data, source = inputs.shuffled_data(config, system, run_dir, ctx)
    checkpoints = state.checkpoints_of(run_dir, config, resume, ctx)
    saved = state.load_agreed(checkpoints, config, ctx.rank, ctx.device) if resume else None
    start_epoch, start_step = (int(saved[state.EPOCH]), int(saved[state.STEP])) if saved else (0, 0)
    if start_epoch >= config.train.epochs:
        log.info("run %s already finished (%d epochs); nothing to do", config.name, config.train.epochs)
        return run_files.saved_summary(run_dir)
    if saved:  # before the first set_epoch: a loss-driven plan needs its observed state to stage
        data.load_state_dict(saved[state.DATA])
    data.set_epoch(start_epoch)  # stages (or reopens and recovers) a store before anything is timed
    run = Run.build(config, system, run_dir, ctx, data, source, checkpoints, saved, resume, start_epoch)
    run.resident = inputs.resident_copy(data, ctx.device, config.train.resident)
    run.total_steps = start_epoch * run.steps_per_epoch + run.first_step()
    partial = state.partial_of(saved, ctx.rank, ctx.world_size) if saved and start_step else None
    return run_epochs(run, data, config, run_dir, ctx.world_size, start_epoch, partial, started)


@dataclasses.dataclass
class Run:
    """What every epoch of one rank's training uses, built once."""

    config: RunConfig
    ctx: distributed.DistContext
    run_dir: Path
    data: ShuffledData
    source: SampleSource
    model: nn.Module
    ddp: DistributedDataParallel
    forward: Any  # ddp, or ddp compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    criterion: nn.Module
    test_loader: DataLoader
    checkpoints: Checkpoints
    outputs: MetricsFiles | None
    progress: Progress
    footprint: metrics.Footprint
    sample_bytes: float  # mean bytes per stored sample (for the bytes_planned and storage columns)
    dataset_labels: np.ndarray  # samples per class in the whole training set
    total_steps: int = 0
    _resumed_at: tuple[int, int] = (0, 0)  # (first step, samples consumed) of the selected epoch
    resident: tuple[torch.Tensor, torch.Tensor] | None = None  # train.resident: the set on the device

    @classmethod
    def build(
        cls, config: RunConfig, system: SystemConfig, run_dir: Path, ctx: distributed.DistContext,
        data: ShuffledData, source: SampleSource, checkpoints: Checkpoints, saved: dict[str, Any] | None,
        resume: bool, start_epoch: int,
    ) -> Run:  # fmt: skip
        cfg = config.train
        torch.manual_seed(config.seed)  # identical initial weights on every rank (DDP checks them)
        model = build_model(config.model, source.shape, source.num_classes).to(ctx.device)
        if config.model.norm == "sync-batch" and ctx.world_size > 1:
            per_node = config.dist.ranks_per_node or ctx.local_world
            model = sync_ranks(model, ctx.device, config.model.sync_group, ctx.rank, ctx.world_size, per_node)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        devices = None if ctx.device.type == "cpu" else [ctx.local_rank]
        ddp = DistributedDataParallel(model, device_ids=devices)
        settle_buckets(ddp, step.example_batch(source.shape, ctx.device, cfg.channels_last))
        optimizer = step.build_optimizer(model, config)
        scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        if saved:
            state.restore(saved, model, optimizer, scaler)
            state.set_rng(saved[state.RNG], ctx.rank, ctx.world_size, ctx.device, step=int(saved[state.STEP]))
        else:
            torch.manual_seed(step.rank_seed(config.seed, ctx.rank))  # per-rank randomness (dropout)
        test_loader = step.test_loader(config, system, ctx.rank, ctx.world_size)
        return cls(
            config, ctx, run_dir, data, source, model, ddp,
            torch.compile(ddp, backend=cfg.compile_backend) if cfg.compile else ddp, optimizer, scaler,
            nn.CrossEntropyLoss(reduction="none", label_smoothing=cfg.label_smoothing), test_loader,
            checkpoints, run_files.open_outputs(run_dir, config, system, ctx, resume, start_epoch),
            Progress(config.log.progress, config.log.every_steps, enabled=ctx.is_main),
            metrics.Footprint(data.planner, start_epoch, [ctx.rank]), metrics.mean_sample_bytes(source),
            np.bincount(source.targets, minlength=source.num_classes),
        )  # fmt: skip

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.data.planner.samples_per_rank / self.config.train.batch_size)

    def first_step(self) -> int:
        """The step the selected epoch starts at: the steps its samples already trained take (after
        an elastic resume mid-epoch, the rest is dealt over this job's ranks and ends the epoch)."""
        remaining = math.ceil(self.data.sampler.remaining / self.config.train.batch_size)
        consumed = self.data.sampler.state_dict()[ShuffleSampler.STATE_POSITION]
        self._resumed_at = (self.steps_per_epoch - remaining, consumed)
        return self._resumed_at[0]

    def reached_max_steps(self) -> bool:
        return bool(self.config.train.max_steps) and self.total_steps >= self.config.train.max_steps

    def train_epoch(
        self, epoch: int, first_step: int, partial: list[float] | None
    ) -> tuple[metrics.EpochStats, bool]:
        """Steps ``first_step ..`` of ``epoch``; whether the epoch ran to its end."""
        cfg, ctx = self.config.train, self.ctx
        stats = metrics.EpochStats.from_numbers(partial) if partial else None
        stats = stats or metrics.EpochStats(label_counts=[0] * self.source.num_classes)
        loader = inputs.epoch_batches(
            self.data, self.resident, cfg.batch_size, cfg.workers, cfg.pin_memory,
            step.rank_seed(self.config.seed, ctx.rank) + epoch,
        )  # fmt: skip
        remaining = math.ceil(self.data.sampler.remaining / cfg.batch_size)
        distributed.check_equal_batches(self.steps_per_epoch - first_step, remaining, ctx.device)
        self.model.train()
        self.progress.start(epoch, self.steps_per_epoch, first_step)
        self.step_rows: list[dict[str, Any]] = []
        batches = iter(loader)
        for at in range(first_step, self.steps_per_epoch):
            tick = metrics.mark(ctx.device)  # never waits for the device: it runs ahead of the host
            images, labels, ids = next(batches)
            images = images.to(ctx.device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            loaded = metrics.mark(ctx.device)
            loss, per_sample, logits, computed = self.step(epoch, at, images, labels)
            marks = (tick, loaded, computed, metrics.mark(ctx.device))
            stats.add_step(marks, per_sample, logits, labels, ids)
            self.data.record_losses(ids, per_sample)
            if self.config.log.step_losses:
                mean_loss = loss.detach().float().clone()
                dist.all_reduce(mean_loss)
                self.step_rows.append({"epoch": epoch, "step": at, "loss": float(mean_loss) / ctx.world_size})
            self.progress.step(at, loss.detach())  # read back only on the steps it prints
            self.total_steps += 1
            due = bool(cfg.checkpoint_steps) and (at + 1) % cfg.checkpoint_steps == 0
            if (self.reached_max_steps() or due) and at + 1 < self.steps_per_epoch:
                self.save(epoch, at + 1, stats)
            if self.reached_max_steps() and at + 1 < self.steps_per_epoch:
                self.progress.finish()
                log.info("stopped at train.max_steps=%d (a checkpoint holds it)", cfg.max_steps)
                return stats, False
        self.progress.finish()
        return stats, True

    def step(self, epoch: int, at: int, images: torch.Tensor, labels: torch.Tensor):
        """Forward (mixup, AMP), backward, gradient exchange, update. Returns the mean loss, the
        per-sample losses, the logits and when backward ended (the fw+bw / ge+wu split)."""
        cfg = self.config.train
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.total_steps, self.steps_per_epoch, cfg, self.ctx.world_size)
        amp = torch.autocast(self.ctx.device.type, dtype=step.amp_dtype(cfg.amp), enabled=cfg.amp != "off")
        with step.gradient_sync(self.ddp, self.config):
            with amp:
                logits, per_sample = step.forward_loss(
                    self.forward, self.criterion, images, labels.to(self.ctx.device, non_blocking=True),
                    self.config, epoch, at, self.ctx.rank,
                )  # fmt: skip
            loss = per_sample.mean()
            step.backward(loss, self.scaler)
        computed = metrics.mark(self.ctx.device)
        if cfg.grad_sync == "explicit":
            step.all_reduce_gradients(self.model, self.ctx.world_size)
        step.optimizer_step(self.optimizer, self.scaler)
        return loss, per_sample, logits, computed

    def finish_epoch(
        self, epoch: int, stats: metrics.EpochStats, epoch_started: float, commit_s: float
    ) -> dict[str, Any]:
        """The epoch boundary: losses to the plan and the next exchange prepared everywhere
        (``end_epoch``), recalibration, evaluation, the metrics rows, then the checkpoint: after
        every rank prepared the next epoch's samples, before ``set_epoch`` commits them."""
        cfg, ctx, data = self.config.train, self.ctx, self.data
        train_s = time.perf_counter() - epoch_started
        boundary = time.perf_counter()
        exchange = data.end_epoch()
        store_mode = data.mode == "store"
        exposed_s = time.perf_counter() - boundary + commit_s if store_mode else math.nan
        exchange_s = (exchange.seconds if exchange else 0.0) if store_mode else math.nan
        plan = data.plan
        assert plan is not None  # set_epoch planned this epoch
        if cfg.bn_recalibrate:
            own = plan.indices(ctx.rank)[: cfg.bn_recalibrate_batches * cfg.batch_size].tolist()
            loader = DataLoader(data.dataset, batch_size=cfg.batch_size, sampler=own, collate_fn=collate)
            recalibrate_batchnorm(self.model, (batch[0] for batch in loader), ctx.device)
        epoch_s = time.perf_counter() - epoch_started
        eval_started = time.perf_counter()
        scores = step.evaluate(self.model, self.test_loader, self.criterion, ctx.device, self.config)
        eval_s = time.perf_counter() - eval_started

        last_epoch = epoch + 1 == cfg.epochs
        churn, coverage, storage = self.footprint.update(plan, ctx.rank, last_epoch)
        per_node = self.config.dist.ranks_per_node or ctx.local_world  # the ranks sharing a node's storage
        rank_values = [
            *stats.to_numbers()[:7], exchange_s, exposed_s,
            exchange.bytes_sent if exchange else 0, exchange.bytes_received if exchange else 0,
            js_distance(stats.label_counts, self.dataset_labels), float(stats.order_hash), epoch_s, train_s,
            *metrics.moved(plan, ctx.rank, last_epoch, per_node), churn, coverage, storage,
        ]  # fmt: skip
        ranks = metrics.gather(rank_values, ctx.device, ctx.world_size)
        lr = self.optimizer.param_groups[0]["lr"]
        row = metrics.epoch_row(epoch, ranks, scores, eval_s, lr, self.sample_bytes)
        if self.outputs is not None:
            self.outputs.write(row, metrics.rank_rows(epoch, ranks), self.step_rows)
            log.info("%s", metrics.epoch_line(row))
        if store_mode or last_epoch or (cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0):
            self.save(epoch + 1, 0, None)
        return row

    def save(self, epoch: int, at_step: int, partial: metrics.EpochStats | None) -> None:
        """Every rank contributes its RNG state and epoch totals; rank 0 writes (collective)."""
        ctx = self.ctx
        # mid-epoch, the position is what training consumed (the loader's workers run ahead)
        first, consumed = self._resumed_at
        position = None if partial is None else consumed + (at_step - first) * self.config.train.batch_size
        totals = metrics.gather_numbers(partial.to_numbers(), ctx.device, ctx.world_size) if partial else None
        checkpoint = state.build(
            epoch, at_step, self.config, self.model, self.optimizer, self.scaler,
            self.data.state_dict(position), state.gather_rng(ctx.device, ctx.world_size), totals,
        )  # fmt: skip
        if self.checkpoints.writes:
            self.checkpoints.save(checkpoint, epoch, at_step)
        dist.barrier()
