"""Virtual ranks (``dist.virtual_ranks: M``): one process trains exactly as M DDP ranks would.

With equal per-rank batches, a DDP step is the gradient of the mean over ranks of each rank's
mean loss; what makes ranks differ is their data, their BatchNorm statistics and their random
draws. So each virtual step takes every rank's next batch from the same plan real ranks would
use (a planner with world size M), forwards them as one batch (rank 0's first), and:

* averages each rank's mean loss (the gradient DDP's all-reduce would give);
* ``model.norm=batch``: normalises each rank's slice with its own statistics and keeps rank 0's
  running statistics (:class:`~reshuffle.models.virtual.GhostBatchNorm`); ``sync-batch``:
  ordinary BatchNorm over all ranks' samples; ``group``/``none``: nothing to do;
* draws dropout masks from each rank's own stream, mixup pairs from each rank's key, and
  augmentation from each sample's key, as the ranks would;
* LR scaling, plans, per-sample losses, label-distribution distances and the CSV files are
  those of an M-rank run. Columns that mean nothing in one process (``io_s``, ``fw_bw_s``,
  ``ge_wu_s``, the exchange columns) are left empty; ``virtual`` is M.

When M x batch exceeds ``dist.virtual_batch_limit`` samples, ranks are forwarded in chunks and
the gradients accumulate: the same result (``sync-batch`` needs every rank in one forward).
Checkpoints are written at epoch ends; ``--resume`` continues from the last one.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from reshuffle.config import ConfigError, RunConfig, SystemConfig
from reshuffle.data import SourceDataset, open_source, transform_for
from reshuffle.data.dataset import collate
from reshuffle.data.source import SampleSource
from reshuffle.memory import keep_freed_memory
from reshuffle.models import build_model
from reshuffle.models.norm import batchnorms
from reshuffle.models.sync_batchnorm import sync_group_size
from reshuffle.models.virtual import set_groups, virtualize
from reshuffle.plan import EpochPlan
from reshuffle.plan.quality import js_distance
from reshuffle.shuffled import ShuffledData
from reshuffle.train import distributed, inputs, metrics, run_files, state, step
from reshuffle.train.checkpoint import Checkpoints
from reshuffle.train.epochs import run_epochs
from reshuffle.train.outputs import MetricsFiles
from reshuffle.train.progress import Progress
from reshuffle.train.recalibrate import assign_batchnorm, estimate_batchnorm
from reshuffle.train.schedule import lr_at

log = run_files.log
PLANNER = "planner"  # the data state of a virtual run: the planner's (all ranks share it)


def train_virtual(
    config: RunConfig, system: SystemConfig, run_dir: Path, *, resume: bool = False
) -> dict[str, Any]:
    """Train ``config`` as ``config.dist.virtual_ranks`` ranks in this one process."""
    ctx = distributed.setup(system.backend, config.dist.timeout_s)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        if ctx.world_size != 1:
            raise ConfigError(
                f"dist.virtual_ranks={config.dist.virtual_ranks} trains every rank in one process, but this "
                f"job has {ctx.world_size} processes; run it without torchrun/srun and with --nproc 1"
            )
        with keep_freed_memory(step.keeps_freed_memory(config, ctx.device)):
            return _train(config, system, run_dir, ctx, resume)
    except BaseException as error:
        run_files.log_failure(error)
        raise
    finally:
        torch.use_deterministic_algorithms(deterministic)
        distributed.teardown()


def _train(
    config: RunConfig, system: SystemConfig, run_dir: Path, ctx: distributed.DistContext, resume: bool
) -> dict[str, Any]:
    started = time.time()
    run_files.start_logging(run_dir, 0)
    _check(config)
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True)
    checkpoints = state.checkpoints_of(run_dir, config, resume)
    saved = state.load(checkpoints, config) if resume else None
    if saved and int(saved[state.STEP]) != 0:
        raise ConfigError(
            f"{checkpoints.latest()} is a mid-epoch checkpoint; virtual runs resume at epoch ends"
        )
    start_epoch = int(saved[state.EPOCH]) if saved else 0
    if start_epoch >= config.train.epochs:
        log.info("run %s already finished (%d epochs); nothing to do", config.name, config.train.epochs)
        return run_files.saved_summary(run_dir)
    # the plans of every rank, as M real ranks would have them (rank 0's sampler is not used)
    world = config.dist.virtual_ranks
    every_rank = dataclasses.replace(
        ctx, rank=0, world_size=world, local_world=config.dist.ranks_per_node or 1
    )
    data, source = inputs.shuffled_data(config, system, run_dir, every_rank)
    if saved and PLANNER in saved[state.DATA]:  # a checkpoint written before virtual runs had a data path
        data.planner.load_state_dict(saved[state.DATA][PLANNER])
    elif saved:
        data.load_state_dict(saved[state.DATA])
    run = VirtualRun.build(
        config, system, run_dir, ctx, data, source, checkpoints, saved, resume, start_epoch
    )
    return run_epochs(run, data, config, run_dir, world, start_epoch, None, started)


def _check(config: RunConfig) -> None:
    batch = config.train.batch_size
    if config.shuffle.mode != "index":
        raise ConfigError(
            "dist.virtual_ranks: virtual ranks share one process and read the dataset directly; "
            "use shuffle.mode=index (store mode needs real ranks)"
        )
    shared = statistics_ranks(config)
    if shared * batch > config.dist.virtual_batch_limit:
        raise ConfigError(
            f"model.norm=sync-batch over {shared} virtual ranks x batch {batch} needs "
            f"{shared * batch} samples in one forward; raise dist.virtual_batch_limit"
        )


def statistics_ranks(config: RunConfig) -> int:
    """Ranks whose samples one BatchNorm normalises together: a forward keeps them in one piece
    (``sync-batch``: the group, all ranks by default; otherwise 1)."""
    if config.model.norm != "sync-batch":
        return 1
    world = config.dist.virtual_ranks
    return sync_group_size(config.model.sync_group, world, config.dist.ranks_per_node)


@dataclasses.dataclass
class EpochTotals:
    """What one epoch of every virtual rank added up to, rank by rank."""

    plan: EpochPlan
    order: np.ndarray  # (M, samples per rank): the ids each rank trains, in order
    loss_sum: np.ndarray
    correct: np.ndarray
    samples: np.ndarray
    label_counts: np.ndarray  # (M, classes)
    train_s: float = 0.0
    step_rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @classmethod
    def zeros(cls, plan: EpochPlan, classes: int) -> EpochTotals:
        order = np.stack([plan.indices(r) for r in range(plan.world_size)])
        world = order.shape[0]
        return cls(
            plan, order, np.zeros(world), np.zeros(world), np.zeros(world),
            np.zeros((world, classes), dtype=np.int64),
        )  # fmt: skip


@dataclasses.dataclass
class VirtualRun:
    """What every epoch of a virtual run uses, built once."""

    config: RunConfig
    ctx: distributed.DistContext
    world: int
    chunk: int  # ranks per forward
    data: ShuffledData  # the data path of all M ranks: their plans, the dataset, the losses
    test_loader: DataLoader
    model: nn.Module
    forward: Any  # model, or model compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    criterion: nn.Module
    checkpoints: Checkpoints
    outputs: MetricsFiles
    progress: Progress
    footprint: metrics.Footprint
    sample_bytes: float
    dataset_labels: np.ndarray
    total_steps: int = 0

    @classmethod
    def build(
        cls, config: RunConfig, system: SystemConfig, run_dir: Path, ctx: distributed.DistContext,
        data: ShuffledData, train_source: SampleSource, checkpoints: Checkpoints,
        saved: dict[str, Any] | None, resume: bool, start_epoch: int,
    ) -> VirtualRun:  # fmt: skip
        world, cfg = config.dist.virtual_ranks, config.train
        test_source = open_source(config.data, "test", system)
        test_loader = DataLoader(
            SourceDataset(test_source, transform_for(config.data, "test", system)),
            batch_size=cfg.batch_size * 2, num_workers=cfg.workers, collate_fn=collate,
        )  # fmt: skip
        torch.manual_seed(config.seed)  # the initial weights every real rank starts from
        shared = statistics_ranks(config)
        model = virtualize(
            build_model(config.model, train_source.shape, train_source.num_classes),
            norm=config.model.norm,
            dropout_seeds=[step.rank_seed(config.seed, r) for r in range(world)],
            statistics_ranks=shared if shared < world else None,
        ).to(ctx.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = step.build_optimizer(model, config)
        scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        if saved:
            state.restore(saved, model, optimizer, scaler)
            state.set_rng(saved[state.RNG], 0, 1, ctx.device)
        chunk = max(shared, min(world, config.dist.virtual_batch_limit // cfg.batch_size) // shared * shared)
        run_files.write_run_files(
            run_dir, config, system, world_size=world, backend=ctx.backend, device=ctx.device, resume=resume,
            hosts=run_files.gather_hosts(ctx.device, 1), virtual_ranks=world, ranks_per_forward=chunk,
        )  # fmt: skip
        run = cls(
            config, ctx, world, chunk, data, test_loader, model,
            torch.compile(model, backend=cfg.compile_backend) if cfg.compile else model, optimizer, scaler,
            nn.CrossEntropyLoss(reduction="none", label_smoothing=cfg.label_smoothing), checkpoints,
            MetricsFiles(run_dir, resume_epoch=start_epoch, tensorboard=config.log.tensorboard),
            Progress(config.log.progress, config.log.every_steps, enabled=True),
            metrics.Footprint(data.planner, start_epoch, list(range(world))),
            metrics.mean_sample_bytes(train_source),
            np.bincount(train_source.targets, minlength=train_source.num_classes),
        )  # fmt: skip
        run.total_steps = start_epoch * run.steps_per_epoch
        log.info("virtual ranks: %d, %d per forward, %d steps per epoch", world, chunk, run.steps_per_epoch)
        return run

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.data.planner.samples_per_rank / self.config.train.batch_size)

    def first_step(self) -> int:
        return 0  # virtual runs resume at epoch ends

    def reached_max_steps(self) -> bool:
        return bool(self.config.train.max_steps) and self.total_steps >= self.config.train.max_steps

    def train_epoch(
        self, epoch: int, first_step: int, partial: list[float] | None
    ) -> tuple[EpochTotals | None, bool]:
        """Every rank's steps of ``epoch`` (the data path selected it); whether it ran to its end
        (``train.max_steps`` can stop it part-way: a virtual run keeps no mid-epoch checkpoint)."""
        cfg, batch, steps = self.config.train, self.config.train.batch_size, self.steps_per_epoch
        started = time.perf_counter()
        plan = self.data.plan
        assert plan is not None  # set_epoch planned this epoch
        totals = EpochTotals.zeros(plan, len(self.dataset_labels))
        order = totals.order
        loader = DataLoader(
            self.data.dataset,
            batch_sampler=[order[:, s * batch : (s + 1) * batch].reshape(-1).tolist() for s in range(steps)],
            num_workers=cfg.workers, collate_fn=collate, pin_memory=cfg.pin_memory,
        )  # fmt: skip
        self.model.train()
        self.progress.start(epoch, steps, 0)
        for at, (images, labels, ids) in enumerate(loader):
            images, labels = images.to(self.ctx.device), labels.to(self.ctx.device)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            step_loss = self.step(epoch, at, images, labels, ids, totals)
            if self.config.log.step_losses:
                totals.step_rows.append({"epoch": epoch, "step": at, "loss": step_loss})
            self.progress.step(at, step_loss)
            self.total_steps += 1
            if self.reached_max_steps() and at + 1 < steps:
                self.progress.finish()
                log.info("stopped after train.max_steps=%d steps (virtual runs checkpoint at epoch ends)",
                         self.total_steps)  # fmt: skip
                return None, False
        self.progress.finish()
        totals.train_s = time.perf_counter() - started
        return totals, True

    def step(
        self, epoch: int, at: int, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor,
        totals: EpochTotals,
    ) -> float:  # fmt: skip
        """One DDP step of every rank, forwarded ``chunk`` ranks at a time; returns the mean loss."""
        cfg, world, model = self.config.train, self.world, self.model
        per_rank = images.shape[0] // world
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.total_steps, self.steps_per_epoch, cfg, world)
        step_loss = 0.0
        for first in range(0, world, self.chunk):
            ranks = range(first, min(world, first + self.chunk))
            part = slice(first * per_rank, ranks.stop * per_rank)
            set_groups(model, len(ranks), first)
            with torch.autocast(
                self.ctx.device.type, dtype=step.amp_dtype(cfg.amp), enabled=cfg.amp != "off"
            ):
                logits, per_sample = step.forward_ranks(
                    self.forward, self.criterion, images[part], labels[part], self.config, epoch, at, ranks
                )
            loss = per_sample.view(len(ranks), per_rank).mean(1).sum() / world  # the mean over all ranks
            step.backward(loss, self.scaler)
            step_loss += float(loss.detach())
            detached = per_sample.detach().float().view(len(ranks), per_rank)
            totals.loss_sum[first : ranks.stop] += detached.sum(1).cpu().numpy()
            hits = (logits.detach().argmax(1) == labels[part]).view(len(ranks), per_rank)
            totals.correct[first : ranks.stop] += hits.sum(1).cpu().numpy()
            self.data.record_losses(ids[part], per_sample.detach())
        set_groups(model, 1)
        step.optimizer_step(self.optimizer, self.scaler)
        totals.samples += per_rank
        rank_of = np.repeat(np.arange(world), per_rank)
        np.add.at(totals.label_counts, (rank_of, labels.cpu().numpy()), 1)
        return step_loss

    def finish_epoch(
        self, epoch: int, totals: EpochTotals, epoch_started: float, commit_s: float
    ) -> dict[str, Any]:
        """Recalibration, losses to the plan, evaluation, the metrics rows and the checkpoint."""
        cfg, world, plan = self.config.train, self.world, totals.plan
        if cfg.bn_recalibrate and batchnorms(self.model):
            _recalibrate(self.model, self.data.dataset, plan, world, cfg, self.ctx.device)
        self.data.end_epoch()  # the epoch's losses to the plan (a loss-driven strategy's next partition)
        epoch_s = time.perf_counter() - epoch_started
        eval_started = time.perf_counter()
        scores = step.evaluate(self.model, self.test_loader, self.criterion, self.ctx.device, self.config)
        eval_s = time.perf_counter() - eval_started

        last_epoch = epoch + 1 == cfg.epochs
        ranks = []
        for r in range(world):
            churn, coverage, storage = self.footprint.update(plan, r, last_epoch)
            moved, across = metrics.moved(plan, r, last_epoch, self.config.dist.ranks_per_node or 1)
            ranks.append({
                **dict.fromkeys(metrics.FIELDS, math.nan),
                "steps": self.steps_per_epoch, "samples": totals.samples[r], "loss_sum": totals.loss_sum[r],
                "correct": totals.correct[r], "bytes_sent": 0, "bytes_received": 0,
                "order_hash": metrics.order_hash(totals.order[r].tolist()),
                "label_js": js_distance(totals.label_counts[r].tolist(), self.dataset_labels),
                "epoch_s": epoch_s, "train_s": totals.train_s, "moved": moved,
                "moved_across": across, "churn": churn, "coverage": coverage, "storage": storage,
            })  # fmt: skip
        lr = self.optimizer.param_groups[0]["lr"]
        row = metrics.epoch_row(epoch, ranks, scores, eval_s, lr, self.sample_bytes, virtual=world)
        self.outputs.write(row, metrics.rank_rows(epoch, ranks), totals.step_rows)
        log.info("%s", metrics.epoch_line(row))
        if last_epoch or (cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0):
            checkpoint = state.build(
                epoch + 1, 0, self.config, self.model, self.optimizer, self.scaler,
                self.data.state_dict(), state.gather_rng(self.ctx.device, 1), None,
            )  # fmt: skip
            self.checkpoints.save(checkpoint, epoch + 1, 0)
        return row


@torch.no_grad()
def _recalibrate(model, dataset, plan, world: int, train_cfg, device) -> None:
    """``train.bn_recalibrate`` as the ranks do it: each estimates from its own batches, then the
    estimates are averaged (the all-reduce)."""
    total = None
    for rank in range(world):
        own = plan.indices(rank)[: train_cfg.bn_recalibrate_batches * train_cfg.batch_size].tolist()
        batches = (
            b[0]
            for b in DataLoader(dataset, batch_size=train_cfg.batch_size, sampler=own, collate_fn=collate)
        )
        estimate = estimate_batchnorm(model, batches, device)
        total = estimate if total is None else total + estimate
    assert total is not None  # every job has a rank
    assign_batchnorm(model, total / world)
