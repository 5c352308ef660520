"""One training step's parts, shared by the real trainer and virtual ranks: the optimizer,
forward with mixup (and AMP via the caller's autocast), backward, the explicit gradient
all-reduce, and evaluation on the test set."""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from reshuffle.config import ConfigError, RunConfig, SystemConfig
from reshuffle.data import SourceDataset, open_source, transform_for
from reshuffle.data.dataset import collate


def check_device_options(config: RunConfig, device: torch.device) -> None:
    if config.train.amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs a CUDA device; use train.amp=bf16 on CPU (or off)")
    if config.train.pin_memory and device.type != "cuda":
        logging.getLogger("reshuffle").info("train.pin_memory has no effect without CUDA")


def keeps_freed_memory(config: RunConfig, device: torch.device) -> bool:
    """``train.keep_freed_memory``: ``auto`` keeps it when training on the CPU, where every step's
    activations are host memory (see :mod:`reshuffle.memory`)."""
    mode = config.train.keep_freed_memory
    return mode == "on" or (mode == "auto" and device.type == "cpu")


def build_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    kinds = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    try:
        return kinds[config.train.optimizer](
            model.parameters(), lr=config.train.lr, **config.train.optimizer_kwargs
        )
    except TypeError as error:
        raise ConfigError(f"train.optimizer_kwargs: {error}") from None


def amp_dtype(amp: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp, torch.float32)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of ``rank``'s own random streams (dropout, mixup, loader workers)."""
    return (seed * 1_000_003 + rank * 7919 + 17) % (2**31 - 1)


def forward_loss(forward, criterion, images, labels, config: RunConfig, epoch: int, step: int, rank: int):
    """Logits and per-sample losses; with mixup, a batch mixed with its own permutation, drawn
    from a generator keyed by (seed, epoch, step, rank) so that resumes and virtual ranks agree."""
    if config.train.mixup_alpha <= 0:
        logits = forward(images)
        return logits, criterion(logits.float(), labels)
    weight, order = mixup_draw(config, epoch, step, rank, images.shape[0])
    order = order.to(images.device)
    logits = forward(weight * images + (1 - weight) * images[order])
    per_sample = weight * criterion(logits.float(), labels) + (1 - weight) * criterion(
        logits.float(), labels[order]
    )
    return logits, per_sample


def forward_ranks(forward, criterion, images, labels, config: RunConfig, epoch: int, step: int, ranks: range):
    """:func:`forward_loss` for several ranks' equal slices in one forward (virtual ranks): each
    slice mixed with its own permutation and weight, drawn as that rank draws them."""
    if config.train.mixup_alpha <= 0:
        logits = forward(images)
        return logits, criterion(logits.float(), labels)
    per_rank = images.shape[0] // len(ranks)
    mixed, weights, partners = [], [], []
    for index, rank in enumerate(ranks):
        part = slice(index * per_rank, (index + 1) * per_rank)
        weight, order = mixup_draw(config, epoch, step, rank, per_rank)
        order = order.to(images.device)
        mixed.append(weight * images[part] + (1 - weight) * images[part][order])
        weights.append(torch.full((per_rank,), weight, device=images.device))
        partners.append(labels[part][order])
    logits = forward(torch.cat(mixed))
    mixing = torch.cat(weights)
    per_sample = mixing * criterion(logits.float(), labels) + (1 - mixing) * criterion(
        logits.float(), torch.cat(partners)
    )
    return logits, per_sample


def mixup_draw(config: RunConfig, epoch: int, step: int, rank: int, size: int) -> tuple[float, torch.Tensor]:
    """Rank ``rank``'s mixup weight and partner order at (epoch, step), from their own key."""
    generator = torch.Generator().manual_seed(
        rank_seed(config.seed, rank) * 1_000_003 + epoch * 100_003 + step
    )
    alpha = torch.tensor([config.train.mixup_alpha], dtype=torch.float64)
    a = torch._standard_gamma(alpha, generator=generator)  # Beta(alpha, alpha) as a Gamma ratio
    b = torch._standard_gamma(alpha, generator=generator)
    return float(a / (a + b)), torch.randperm(size, generator=generator)


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def example_batch(shape: tuple[int, ...], device: torch.device, channels_last: bool) -> torch.Tensor:
    """Two zero samples of ``shape``, laid out as training batches are."""
    batch = torch.zeros(2, *shape, device=device)
    if channels_last and batch.dim() == 4:
        return batch.contiguous(memory_format=torch.channels_last)
    return batch


def gradient_sync(ddp: DistributedDataParallel, config: RunConfig) -> contextlib.AbstractContextManager:
    """Around forward and backward: DDP's all-reduce overlapped with backward, or (``explicit``)
    none, the caller reducing once afterwards. ``no_sync`` must cover the forward too: DDP
    decides there whether the next backward reduces."""
    return ddp.no_sync() if config.train.grad_sync == "explicit" else contextlib.nullcontext()


def all_reduce_gradients(model: nn.Module, world_size: int) -> None:
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


def test_loader(config: RunConfig, system: SystemConfig, rank: int, world_size: int) -> DataLoader:
    """Rank ``rank``'s shard of the test set (every ``world_size``-th sample)."""
    test = SourceDataset(open_source(config.data, "test", system), transform_for(config.data, "test", system))
    return DataLoader(
        test, batch_size=config.train.batch_size * 2, sampler=list(range(rank, len(test), world_size)),
        num_workers=config.train.workers, collate_fn=collate, pin_memory=config.train.pin_memory,
    )  # fmt: skip


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, criterion: nn.Module, device: torch.device, config: RunConfig
) -> dict[str, float]:
    """Test loss, top-1 and top-5 over the whole test set (each rank a shard), with rank 0's
    BatchNorm running statistics, as DDP would use them."""
    for buffer in model.buffers():
        dist.broadcast(buffer, 0)
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)
    for images, labels, _ in loader:
        images, labels = images.to(device), labels.to(device)
        if config.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(
            device.type, dtype=amp_dtype(config.train.amp), enabled=config.train.amp != "off"
        ):
            logits = model(images).float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        totals += torch.tensor([
            float(criterion(logits, labels).sum()), float((top5[:, 0] == labels).sum()),
            float((top5 == labels[:, None]).any(1).sum()), float(labels.shape[0]),
        ], dtype=torch.float64)  # fmt: skip
    totals = totals.to(device)
    dist.all_reduce(totals)
    loss, top1, top5, count = totals.tolist()
    model.train()
    return {"test_loss": loss / count, "test_top5": top5 / count, "test_acc": top1 / count}
