"""Cross-rank BatchNorm that also runs on CPU (``nn.SyncBatchNorm`` requires GPU tensors).

In training mode, batch statistics are the mean and (biased) variance over the samples of *all*
ranks: one all-reduce of per-channel [count, sum, sum of squares] (float64) per layer and step.
The all-reduce is differentiable (:class:`_AllReduceSum`: the sum's gradient is the sum of the
ranks' gradients), so gradients are exactly those of normalising the union of the ranks'
batches. Running statistics are updated as BatchNorm does (unbiased variance), identically on
every rank.

On CUDA, :func:`convert_sync_batchnorm` uses PyTorch's own ``nn.SyncBatchNorm`` instead.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.distributed as dist
from torch import nn

from reshuffle.config import ConfigError


def sync_group_size(spec: str | int, world: int, ranks_per_node: int | None) -> int:
    """Ranks per SyncBatchNorm group for ``model.sync_group`` = ``spec``: ``all`` (``world``),
    ``node`` (``ranks_per_node``) or an integer; the groups are consecutive ranks and equal, so the
    size must divide ``world``."""
    if spec == "all":
        return world
    if spec == "node":
        if not ranks_per_node:
            raise ConfigError(
                "model.sync_group=node needs the ranks per node: set dist.ranks_per_node (virtual ranks, or "
                "a launcher that does not set LOCAL_WORLD_SIZE)"
            )
        size = ranks_per_node
    else:
        size = int(spec)
    if size < 1 or world % size:
        raise ConfigError(
            f"model.sync_group: groups of {size} ranks do not divide {world} ranks into equal groups; use a "
            f"divisor of {world}"
        )
    return size


def sync_group(size: int, rank: int, world: int) -> dist.ProcessGroup | None:
    """This rank's SyncBatchNorm process group: groups of ``size`` consecutive ranks (collective:
    every rank creates every group). None: all ranks (the default group)."""
    if size == world:
        return None
    groups = [dist.new_group(list(range(first, first + size))) for first in range(0, world, size)]
    return cast(dist.ProcessGroup, groups[rank // size])  # every rank is in its own group


def sync_ranks(
    module: nn.Module,
    device: torch.device,
    spec: str | int,
    rank: int,
    world: int,
    ranks_per_node: int | None,
) -> nn.Module:
    """``model.norm=sync-batch`` for ``rank`` of ``world`` (collective): BatchNorm statistics over
    the rank's group (``model.sync_group`` = ``spec``); groups of one rank keep plain BatchNorm."""
    size = sync_group_size(spec, world, ranks_per_node)
    if size == 1:
        return module
    return convert_sync_batchnorm(module, device, sync_group(size, rank, world))


class _AllReduceSum(torch.autograd.Function):
    """A differentiable sum all-reduce (what ``torch.distributed.nn.functional.all_reduce`` does;
    deprecated in recent torch, warns once per process)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        reduced = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(reduced, group=group)
        return reduced

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None


class CrossRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over (N, C, ...) inputs whose training statistics span every rank of ``group``
    (all ranks when None)."""

    group: dist.ProcessGroup | None = None

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        synced = (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.group) > 1
        )
        if not synced:
            return super().forward(input)
        dims = [d for d in range(input.dim()) if d != 1]
        x = input.to(torch.float64)
        count = torch.full(
            (input.shape[1],), input.numel() / input.shape[1], dtype=torch.float64, device=input.device
        )
        stats = torch.stack([count, x.sum(dims), (x * x).sum(dims)])
        stats = _AllReduceSum.apply(stats, self.group or dist.group.WORLD)
        total = stats[0]
        mean = stats[1] / total
        var = (stats[2] / total - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                assert self.num_batches_tracked is not None  # tracked with the running statistics
                self.num_batches_tracked.add_(1)
                momentum = (
                    self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                )
                unbiased = var * total / (total - 1).clamp_min(1)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased.to(self.running_var.dtype))
        shape = [1, -1] + [1] * (input.dim() - 2)
        normalised = (input - mean.to(input.dtype).view(shape)) * torch.rsqrt(
            var.to(input.dtype).view(shape) + self.eps
        )
        if self.affine:
            normalised = normalised * self.weight.view(shape) + self.bias.view(shape)
        return normalised


def convert_sync_batchnorm(
    module: nn.Module, device: torch.device, group: dist.ProcessGroup | None = None
) -> nn.Module:
    """Every BatchNorm in ``module`` -> cross-rank BatchNorm over ``group`` (all ranks when None):
    PyTorch's on CUDA, ours on CPU."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group=group)
    return _convert(module, group)


def _convert(module: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CrossRankBatchNorm):
        converted = CrossRankBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            with torch.no_grad():
                converted.weight.copy_(module.weight)
                converted.bias.copy_(module.bias)
        if module.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                getattr(converted, name).copy_(getattr(module, name))
        converted.train(module.training)
        converted.group = group
        return converted
    for name, child in module.named_children():
        setattr(module, name, _convert(child, group))
    return module


__all__ = ["CrossRankBatchNorm", "convert_sync_batchnorm", "sync_group", "sync_group_size", "sync_ranks"]
