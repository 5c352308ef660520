"""``train.bn_recalibrate``: re-estimate BatchNorm running statistics from every rank's own data.

After an epoch, each rank resets its BatchNorm running statistics, runs a few batches of its own
holdings through the model (no gradients; nothing moves between ranks), and the ranks combine
their estimates with one all-reduce: the global mean, and the global variance from each rank's
mean and variance (E[x^2] - E[x]^2, so differences between the ranks' means count). With
non-IID partitions this replaces rank 0's skewed running statistics (what DDP broadcasts) by
statistics of the whole dataset.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from reshuffle.models.norm import batchnorms


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device) -> int:
    """Re-estimate and all-reduce the running statistics of ``model`` (not a DDP wrapper: its
    forward would broadcast rank 0's buffers); returns the number of layers updated."""
    layers = batchnorms(model)
    if not layers:
        return 0
    both = estimate_batchnorm(model, batches, device)
    dist.all_reduce(both)
    assign_batchnorm(model, both / dist.get_world_size())
    return len(layers)


@torch.no_grad()
def estimate_batchnorm(
    model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device
) -> torch.Tensor:
    """One rank's estimate, ``(2, total channels)``: per channel the mean and E[x^2] of every
    BatchNorm layer's input over ``batches`` (the running statistics are left reset to it)."""
    layers = batchnorms(model)
    momenta = [layer.momentum for layer in layers]
    was_training = model.training
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the batches below
    model.train()
    for images in batches:
        model(images.to(device, non_blocking=True))
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    model.train(was_training)
    stats = [_running(layer) for layer in layers]
    means = torch.cat([mean for mean, _ in stats])
    squares = torch.cat([var + mean**2 for mean, var in stats])
    return torch.stack([means, squares])


def _running(layer: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's running mean and variance (recalibration needs layers that track them)."""
    if layer.running_mean is None or layer.running_var is None:
        raise ValueError("train.bn_recalibrate needs BatchNorm layers that track running statistics")
    return layer.running_mean, layer.running_var


@torch.no_grad()
def assign_batchnorm(model: nn.Module, both: torch.Tensor) -> None:
    """Set the running statistics from averaged :func:`estimate_batchnorm` results."""
    offset = 0
    for layer in batchnorms(model):
        mean, var = _running(layer)
        width = mean.numel()
        mean.copy_(both[0, offset : offset + width])
        var.copy_((both[1, offset : offset + width] - both[0, offset : offset + width] ** 2).clamp_min(0))
        offset += width
