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

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from reshuffle.config import ConfigError, RunConfig, SystemConfig, planner_options
from reshuffle.data import SourceDataset, open_source, transform_for
from reshuffle.data.dataset import collate
from reshuffle.losses import LossTracker
from reshuffle.models import build_model
from reshuffle.models.norm import batchnorms
from reshuffle.models.virtual import set_groups, virtualize
from reshuffle.plan import ShufflePlanner
from reshuffle.plan.quality import js_distance
from reshuffle.shuffled import plain
from reshuffle.train import distributed, metrics, run_files, state, step
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
        return _train(config, system, run_dir, ctx, resume)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        distributed.teardown()


def _train(
    config: RunConfig, system: SystemConfig, run_dir: Path, ctx: distributed.DistContext, resume: bool
) -> dict[str, Any]:
    started = time.time()
    world = config.dist.virtual_ranks
    train_cfg = config.train
    run_files.start_logging(run_dir, 0)
    if config.shuffle.mode != "index":
        raise ConfigError(
            "dist.virtual_ranks: virtual ranks share one process and read the dataset directly; "
            "use shuffle.mode=index (store mode needs real ranks)"
        )
    if config.model.norm == "sync-batch" and world * train_cfg.batch_size > config.dist.virtual_batch_limit:
        raise ConfigError(
            f"model.norm=sync-batch with {world} virtual ranks x batch {train_cfg.batch_size} needs all "
            f"{world * train_cfg.batch_size} samples in one forward; raise dist.virtual_batch_limit"
        )
    if train_cfg.deterministic:
        torch.use_deterministic_algorithms(True)

    train_source = open_source(config.data, "train", system)
    test_source = open_source(config.data, "test", system)
    planner = ShufflePlanner(
        len(train_source), world, strategy=config.shuffle.strategy, fraction=config.shuffle.fraction,
        partition=config.shuffle.partition, labels=train_source.targets, seed=config.seed,
        drop_last=config.shuffle.drop_last, **planner_options(config.shuffle),
    )  # fmt: skip
    batch = train_cfg.batch_size
    steps_per_epoch = math.ceil(planner.samples_per_rank / batch)
    chunk = max(1, min(world, config.dist.virtual_batch_limit // batch))
    dataset_labels = np.bincount(train_source.targets, minlength=train_source.num_classes)
    classes = train_source.num_classes
    sample_bytes = metrics.mean_sample_bytes(train_source)

    checkpoints = state.checkpoints_of(run_dir, config, resume)
    saved = state.load(checkpoints, config) if resume else None
    if saved and int(saved[state.STEP]) != 0:
        raise ConfigError(
            f"{checkpoints.latest()} is a mid-epoch checkpoint; virtual runs resume at epoch ends"
        )
    start_epoch = int(saved[state.EPOCH]) if saved else 0
    if saved:
        planner.load_state_dict(saved[state.DATA][PLANNER])

    train_dataset = SourceDataset(train_source, transform_for(config.data, "train", system))
    test_loader = DataLoader(
        SourceDataset(test_source, transform_for(config.data, "test", system)),
        batch_size=batch * 2,
        num_workers=train_cfg.workers,
        collate_fn=collate,
    )

    torch.manual_seed(config.seed)  # the initial weights every real rank starts from
    model = virtualize(
        build_model(config.model, train_source.shape, classes),
        norm=config.model.norm,
        dropout_seeds=[step.rank_seed(config.seed, r) for r in range(world)],
    ).to(ctx.device)
    if train_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model, backend=train_cfg.compile_backend) if train_cfg.compile else model
    optimizer = step.build_optimizer(model, config)
    scaler = torch.amp.GradScaler("cuda") if train_cfg.amp == "fp16" else None
    criterion = nn.CrossEntropyLoss(reduction="none", label_smoothing=train_cfg.label_smoothing)
    tracker = LossTracker(len(train_source))
    tracking = planner.strategy.uses_losses or train_cfg.track_losses
    if saved:
        state.restore(saved, model, optimizer, scaler)
        state.set_rng(saved[state.RNG], 0, 1, ctx.device)

    run_files.write_run_files(
        run_dir, config, world_size=world, backend=ctx.backend, device=ctx.device, resume=resume,
        hosts=run_files.gather_hosts(ctx.device, 1), virtual_ranks=world, ranks_per_forward=chunk,
    )  # fmt: skip
    outputs = MetricsFiles(run_dir, resume_epoch=start_epoch, tensorboard=config.log.tensorboard)
    progress = Progress(config.log.progress, config.log.every_steps, enabled=True)
    log.info("virtual ranks: %d, %d per forward, %d steps per epoch", world, chunk, steps_per_epoch)

    total_steps = start_epoch * steps_per_epoch
    footprint = metrics.Footprint(planner, start_epoch, list(range(world)))
    last_row: dict[str, Any] = {}
    stopped = False
    for epoch in range(start_epoch, train_cfg.epochs):
        epoch_started = time.perf_counter()
        plan = planner.plan(epoch)
        order = np.stack([plan.indices(r) for r in range(world)])  # (M, samples per rank)
        train_dataset.set_epoch(epoch, seed=config.seed)
        loader = DataLoader(
            train_dataset,
            batch_sampler=[
                order[:, s * batch : (s + 1) * batch].reshape(-1).tolist() for s in range(steps_per_epoch)
            ],
            num_workers=train_cfg.workers,
            collate_fn=collate,
            pin_memory=train_cfg.pin_memory,
        )
        loss_sum = np.zeros(world)
        correct = np.zeros(world)
        samples = np.zeros(world)
        label_counts = np.zeros((world, classes), dtype=np.int64)
        step_rows: list[dict[str, Any]] = []
        model.train()
        progress.start(epoch, steps_per_epoch, 0)
        for at, (images, labels, ids) in enumerate(loader):
            images, labels = images.to(ctx.device), labels.to(ctx.device)
            if train_cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            per_rank = images.shape[0] // world
            for group in optimizer.param_groups:
                group["lr"] = lr_at(total_steps, steps_per_epoch, train_cfg, world)
            step_loss = 0.0
            for first in range(0, world, chunk):
                ranks = range(first, min(world, first + chunk))
                part = slice(first * per_rank, ranks.stop * per_rank)
                set_groups(model, len(ranks), first)
                with torch.autocast(
                    ctx.device.type, dtype=step.amp_dtype(train_cfg.amp), enabled=train_cfg.amp != "off"
                ):
                    logits, per_sample = step.forward_ranks(
                        forward, criterion, images[part], labels[part], config, epoch, at, ranks
                    )
                rank_means = per_sample.view(len(ranks), per_rank).mean(1)
                loss = rank_means.sum() / world  # the mean over all ranks, in pieces
                step.backward(loss, scaler)
                step_loss += float(loss.detach())
                detached = per_sample.detach().float().view(len(ranks), per_rank)
                loss_sum[first : ranks.stop] += detached.sum(1).cpu().numpy()
                hits = (logits.detach().argmax(1) == labels[part]).view(len(ranks), per_rank)
                correct[first : ranks.stop] += hits.sum(1).cpu().numpy()
                if tracking:
                    tracker.add(ids[part], per_sample.detach())
            set_groups(model, 1)
            step.optimizer_step(optimizer, scaler)
            samples += per_rank
            rank_of = np.repeat(np.arange(world), per_rank)
            np.add.at(label_counts, (rank_of, labels.cpu().numpy()), 1)
            if config.log.step_losses:
                step_rows.append({"epoch": epoch, "step": at, "loss": step_loss})
            progress.step(at, step_loss)
            total_steps += 1
            if train_cfg.max_steps and total_steps >= train_cfg.max_steps and at + 1 < steps_per_epoch:
                stopped = True
                break
        progress.finish()
        if stopped:
            log.info(
                "stopped after train.max_steps=%d steps (virtual runs checkpoint at epoch ends)", total_steps
            )
            break
        train_s = time.perf_counter() - epoch_started

        if train_cfg.bn_recalibrate and batchnorms(model):
            _recalibrate(model, train_dataset, plan, world, train_cfg, ctx.device)
        if tracking and planner.strategy.uses_losses:
            planner.observe(epoch, *(t.numpy() for t in tracker.mean()))
        tracker.reset()
        epoch_s = time.perf_counter() - epoch_started
        eval_started = time.perf_counter()
        scores = step.evaluate(model, test_loader, criterion, ctx.device, config)
        eval_s = time.perf_counter() - eval_started

        last_epoch = epoch + 1 == train_cfg.epochs
        ranks = []
        for r in range(world):
            churn, coverage, storage = footprint.update(plan, r, last_epoch)
            ranks.append({
                **dict.fromkeys(metrics.FIELDS, math.nan),
                "steps": steps_per_epoch, "samples": samples[r], "loss_sum": loss_sum[r],
                "correct": correct[r], "bytes_sent": 0, "bytes_received": 0,
                "order_hash": metrics.order_hash(order[r].tolist()),
                "label_js": js_distance(label_counts[r].tolist(), dataset_labels), "epoch_s": epoch_s,
                "train_s": train_s, "moved": metrics.moved(plan, r, last_epoch), "churn": churn,
                "coverage": coverage, "storage": storage,
            })  # fmt: skip
        lr = optimizer.param_groups[0]["lr"]
        last_row = metrics.epoch_row(epoch, ranks, scores, eval_s, lr, sample_bytes, virtual=world)
        outputs.write(last_row, metrics.rank_rows(epoch, ranks), step_rows)
        log.info("%s", metrics.epoch_line(last_row))
        if last_epoch or (train_cfg.checkpoint_every and (epoch + 1) % train_cfg.checkpoint_every == 0):
            checkpoint = state.build(
                epoch + 1, 0, config, model, optimizer, scaler, {PLANNER: plain(planner.state_dict())},
                state.gather_rng(ctx.device, 1), None,
            )  # fmt: skip
            checkpoints.save(checkpoint, epoch + 1, 0)

    outputs.close()
    summary = {
        "status": "stopped" if stopped else "completed",
        "epochs": train_cfg.epochs,
        "world_size": world,
        "virtual_ranks": world,
        "wall_s": time.time() - started,
        "final": last_row,
    }
    if not stopped:
        run_files.write_summary(run_dir, summary)
    return summary


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
    assign_batchnorm(model, total / world)
