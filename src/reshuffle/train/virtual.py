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

import json
import logging
import math
import socket
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
from reshuffle.train import distributed
from reshuffle.train import loop as real
from reshuffle.train.checkpoint import Checkpoints
from reshuffle.train.outputs import MetricsFiles
from reshuffle.train.progress import Progress
from reshuffle.train.recalibrate import assign_batchnorm, estimate_batchnorm
from reshuffle.train.schedule import lr_at

log = logging.getLogger("reshuffle")


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
    real._start_logging(run_dir, 0)
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

    checkpoints = Checkpoints(run_dir / "checkpoints", train_cfg.keep_checkpoints)
    if not resume and checkpoints.latest() is not None:
        raise ConfigError(
            f"{run_dir} already holds a run with checkpoints; continue it with --resume, or start a new "
            f"one under another name (name=...) or log.dir, or delete that directory"
        )
    state = real._load_checkpoint(checkpoints, config) if resume else None
    if state and int(state["step"]) != 0:
        raise ConfigError(
            f"{checkpoints.latest()} is a mid-epoch checkpoint; virtual runs resume at epoch ends"
        )
    start_epoch = int(state["epoch"]) if state else 0
    if state:
        planner.load_state_dict(state["planner"])

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
        dropout_seeds=[real._rank_seed(config.seed, r) for r in range(world)],
    ).to(ctx.device)
    if train_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model, backend=train_cfg.compile_backend) if train_cfg.compile else model
    optimizer = real._optimizer(model, config)
    scaler = torch.amp.GradScaler("cuda") if train_cfg.amp == "fp16" else None
    criterion = nn.CrossEntropyLoss(reduction="none", label_smoothing=train_cfg.label_smoothing)
    tracker = LossTracker(len(train_source))
    tracking = planner.strategy.uses_losses or train_cfg.track_losses
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state and scaler is not None:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["cpu"][0])

    real._write_run_files(run_dir, config, ctx, resume, [socket.gethostname()])
    environment = json.loads((run_dir / "env.json").read_text())
    environment.update(virtual_ranks=world, ranks_per_forward=chunk, world_size=world)
    (run_dir / "env.json").write_text(json.dumps(environment, indent=1) + "\n")
    outputs = MetricsFiles(run_dir, resume_epoch=start_epoch, tensorboard=config.log.tensorboard)
    progress = Progress(config.log.progress, config.log.every_steps, enabled=True)
    log.info("virtual ranks: %d, %d per forward, %d steps per epoch", world, chunk, steps_per_epoch)

    total_steps = start_epoch * steps_per_epoch
    footprint = real.Footprint(planner, start_epoch, list(range(world)))
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
        for step, (images, labels, ids) in enumerate(loader):
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
                    ctx.device.type, dtype=real._amp_dtype(train_cfg.amp), enabled=train_cfg.amp != "off"
                ):
                    logits, per_sample = _forward_ranks(
                        forward, criterion, images[part], labels[part], config, epoch, step, ranks
                    )
                rank_means = per_sample.view(len(ranks), per_rank).mean(1)
                loss = rank_means.sum() / world  # the mean over all ranks, in pieces
                (scaler.scale(loss) if scaler is not None else loss).backward()
                step_loss += float(loss.detach())
                detached = per_sample.detach().float().view(len(ranks), per_rank)
                loss_sum[first : ranks.stop] += detached.sum(1).cpu().numpy()
                hits = (logits.detach().argmax(1) == labels[part]).view(len(ranks), per_rank)
                correct[first : ranks.stop] += hits.sum(1).cpu().numpy()
                if tracking:
                    tracker.add(ids[part], per_sample.detach())
            set_groups(model, 1)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            samples += per_rank
            rank_of = np.repeat(np.arange(world), per_rank)
            np.add.at(label_counts, (rank_of, labels.cpu().numpy()), 1)
            if config.log.step_losses:
                step_rows.append({"epoch": epoch, "step": step, "loss": step_loss})
            progress.step(step, step_loss)
            total_steps += 1
            if train_cfg.max_steps and total_steps >= train_cfg.max_steps and step + 1 < steps_per_epoch:
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
        moved = (
            sum(ids.size for r in range(world) for ids in plan.sends(r).values())
            if epoch + 1 < train_cfg.epochs
            else 0
        )
        epoch_s = time.perf_counter() - epoch_started
        eval_started = time.perf_counter()
        test = real._evaluate(model, test_loader, criterion, ctx, train_cfg)
        eval_s = time.perf_counter() - eval_started

        distances = [js_distance(label_counts[r].tolist(), dataset_labels) for r in range(world)]
        figures = [footprint.update(planner, epoch, r, train_cfg.epochs) for r in range(world)]
        total = samples.sum()
        last_row = {
            "epoch": epoch,
            "train_loss": loss_sum.sum() / total,
            "train_acc": correct.sum() / total,
            **test,
            "epoch_s": epoch_s,
            **dict.fromkeys(
                (
                    "io_s",
                    "io_max_s",
                    "fw_bw_s",
                    "ge_wu_s",
                    "exchange_s",
                    "exchange_exposed_s",
                    "exchange_exposed_max_s",
                ),
                math.nan,
            ),
            "bytes_exchanged": 0,
            "samples_moved": int(moved),
            "bytes_planned": int(moved * real._mean_sample_bytes(train_source)),
            "lr": optimizer.param_groups[0]["lr"],
            "samples_per_s": total / train_s,
            "steps": steps_per_epoch,
            "samples": int(total),
            "eval_s": eval_s,
            "label_js": float(np.mean(distances)),
            "label_js_max": float(np.max(distances)),
            "churn": real._nanmean([f[0] for f in figures]),
            "coverage": real._nanmean([f[1] for f in figures]),
            "storage_bytes": int(max(f[2] for f in figures) * real._mean_sample_bytes(train_source)),
            "world_size": world,
            "virtual": world,
        }  # the NaN columns are not measurable in one process: written empty
        rank_rows = [
            {
                "epoch": epoch,
                "rank": r,
                "steps": steps_per_epoch,
                "samples": int(samples[r]),
                "train_loss": loss_sum[r] / samples[r],
                "train_acc": correct[r] / samples[r],
                "bytes_sent": 0,
                "bytes_received": 0,
                "label_js": distances[r],
                "order_sha": f"{_order_hash(order[r]):013x}",
            }
            for r in range(world)
        ]
        outputs.write(last_row, rank_rows, step_rows)
        log.info(
            "epoch %d: train loss %.4f acc %.4f, test acc %.4f, %.1f s (%d virtual ranks)",
            epoch, last_row["train_loss"], last_row["train_acc"], last_row["test_acc"], epoch_s, world,
        )  # fmt: skip
        last_epoch = epoch + 1 == train_cfg.epochs
        if last_epoch or (train_cfg.checkpoint_every and (epoch + 1) % train_cfg.checkpoint_every == 0):
            _save(checkpoints, epoch + 1, model, optimizer, planner, tracker, scaler, config)

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
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
    return summary


def _forward_ranks(
    forward, criterion, images, labels, config: RunConfig, epoch: int, step: int, ranks: range
):
    """One forward of several ranks' slices; with mixup, each slice mixed with its own
    permutation and weight, drawn as that rank draws them (see ``loop._forward_loss``)."""
    if config.train.mixup_alpha <= 0:
        logits = forward(images)
        return logits, criterion(logits.float(), labels)
    per_rank = images.shape[0] // len(ranks)
    mixed, weights, partners = [], [], []
    for index, rank in enumerate(ranks):
        part = slice(index * per_rank, (index + 1) * per_rank)
        weight, order = real._mixup_draw(config, epoch, step, rank, per_rank)
        order = order.to(images.device)
        mixed.append(weight * images[part] + (1 - weight) * images[part][order])
        weights.append(torch.full((per_rank,), weight, device=images.device))
        partners.append(labels[part][order])
    logits = forward(torch.cat(mixed))
    weight = torch.cat(weights)
    per_sample = weight * criterion(logits.float(), labels) + (1 - weight) * criterion(
        logits.float(), torch.cat(partners)
    )
    return logits, per_sample


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


def _order_hash(ids: np.ndarray) -> int:
    value = 0
    for sample in ids.tolist():
        value = ((value * 1_000_003) ^ sample) & 0x000F_FFFF_FFFF_FFFF
    return value


def _save(checkpoints, epoch, model, optimizer, planner, tracker, scaler, config) -> None:
    state = {
        "epoch": epoch,
        "step": 0,
        "config": real._plain(config),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "planner": real._tensors(planner.state_dict()),
        "losses": tracker.state_dict(),
        "rng": {"cpu": [torch.get_rng_state()]},
        "partial": None,
    }
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    checkpoints.save(state, epoch, 0)
