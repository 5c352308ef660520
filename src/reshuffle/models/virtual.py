"""Layers that let one process behave as M data-parallel ranks (``dist.virtual_ranks``).

A virtual step forwards every rank's batch as one batch of ``groups`` equal, consecutive slices
(rank 0's first). Two kinds of layer see across samples or draw random numbers, and so need to
know the slices:

* :class:`GhostBatchNorm` (``model.norm=batch``): each slice is normalised with its own batch
  statistics, as each DDP rank's BatchNorm does; the running statistics are updated from slice 0
  only, because DDP broadcasts rank 0's buffers at every forward (the others' updates are lost).
  One ``F.batch_norm`` call does all slices: the slices are laid side by side as channels.
* :class:`RankDropout`: each slice draws its mask from that rank's own random stream, exactly as
  the rank's global torch generator would on CPU (the trainer seeds rank r's generator and nothing
  else in a real rank draws from it during training). On a GPU the mask is drawn from the same
  CPU stream and moved: the same distribution as a GPU rank's dropout, not its exact numbers.

``model.norm=sync-batch`` needs nothing: statistics over all ranks' samples are ordinary
BatchNorm over the whole virtual batch; with ``model.sync_group`` G, :class:`GhostBatchNorm`
slices the batch into groups of G ranks. ``group`` and ``none`` work per sample anyway.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


class GhostBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with per-slice statistics and rank-0 running statistics (see the module doc)."""

    groups = 1  # set by :func:`set_groups` before each forward: slices in the batch
    first = 0  # the index of slice 0: only a chunk starting at rank 0 updates the running statistics
    ranks_per_slice = 1  # ranks that share statistics: 1 for BatchNorm, G for grouped SyncBatchNorm

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {x.dim()}-D)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.groups
        if not self.training or (groups == 1 and self.first == 0):
            return super().forward(x)
        if groups == 1:  # one slice of a later chunk: its own statistics, rank 0's buffers untouched
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        if x.shape[0] % groups:
            raise ValueError(f"a virtual batch of {x.shape[0]} does not split into {groups} equal ranks")
        update = self.track_running_stats and self.first == 0
        factor = 0.0 if self.momentum is None else self.momentum
        if update and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        size, channels, rest = x.shape[0] // groups, x.shape[1], x.shape[2:]
        side_by_side = (
            x.reshape(groups, size, channels, *rest).transpose(0, 1).reshape(size, groups * channels, *rest)
        )
        mean = var = None
        if self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None  # tracked: they exist
            mean, var = self.running_mean.repeat(groups), self.running_var.repeat(groups)
        weight = self.weight.repeat(groups) if self.weight is not None else None
        bias = self.bias.repeat(groups) if self.bias is not None else None
        out = F.batch_norm(side_by_side, mean, var, weight, bias, True, factor, self.eps)
        if update:
            assert mean is not None and var is not None and self.running_mean is not None
            assert self.running_var is not None
            self.running_mean.copy_(mean[:channels])  # rank 0's update: what DDP keeps
            self.running_var.copy_(var[:channels])
        return out.reshape(size, groups, channels, *rest).transpose(0, 1).reshape(x.shape)


class RankDropout(nn.Module):
    """Dropout whose slice r draws from rank r's random stream (a CPU generator state per rank)."""

    groups = 1

    def __init__(self, p: float, seeds: list[int]) -> None:
        super().__init__()
        self.p = p
        states = []
        keep = torch.get_rng_state()
        for seed in seeds:
            torch.manual_seed(seed)
            states.append(torch.get_rng_state())
        torch.set_rng_state(keep)
        self.register_buffer("rank_states", torch.stack(states))  # saved in checkpoints
        self.first = 0  # the rank of slice 0 (ranks are forwarded in chunks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.get_rng_state()
        try:
            outputs = []
            for index, part in enumerate(x.chunk(self.groups)):
                rank = self.first + index
                # .clone(): a view with an offset crashes torch; .cpu(): the buffer follows the model
                states = cast(torch.Tensor, self.rank_states)  # a buffer
                torch.set_rng_state(states[rank].cpu().clone())
                if part.device.type == "cpu":
                    outputs.append(F.dropout(part, self.p, True))
                else:  # the mask comes from the rank's CPU stream too: the same on every device
                    keep_mask = torch.empty(part.shape).bernoulli_(1.0 - self.p).to(part.device, part.dtype)
                    outputs.append(part * keep_mask / (1.0 - self.p) if self.p < 1 else part * 0)
                states[rank].copy_(torch.get_rng_state())
        finally:
            torch.set_rng_state(keep)
        return torch.cat(outputs)


def virtualize(
    model: nn.Module, *, norm: str, dropout_seeds: list[int], statistics_ranks: int | None = None
) -> nn.Module:
    """Swap ``model``'s BatchNorm and Dropout layers for the virtual kinds, in place, keeping their
    parameters and buffers; returns ``model``. BatchNorm becomes :class:`GhostBatchNorm` for
    ``norm=batch`` (statistics per rank) and for ``norm=sync-batch`` with ``statistics_ranks`` G
    (grouped SyncBatchNorm: statistics per group of G consecutive ranks, running statistics of
    rank 0's group, as DDP broadcasts rank 0's buffers). The new layers are built on the CPU:
    virtualize before moving the model to its device."""
    per_slice = 1 if norm == "batch" else statistics_ranks if norm == "sync-batch" else None
    for name, child in list(model.named_children()):
        if per_slice and isinstance(child, nn.modules.batchnorm._BatchNorm):
            ghost = GhostBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            ghost.load_state_dict(child.state_dict())
            ghost.ranks_per_slice = per_slice
            setattr(model, name, ghost)
        elif isinstance(child, nn.Dropout):
            setattr(model, name, RankDropout(child.p, dropout_seeds))
        else:
            virtualize(child, norm=norm, dropout_seeds=dropout_seeds, statistics_ranks=statistics_ranks)
    return model


def set_groups(model: nn.Module, groups: int, first_rank: int = 0) -> None:
    """Tell the virtual layers that the next forward holds ``groups`` ranks from ``first_rank``."""
    for module in model.modules():
        if isinstance(module, RankDropout):
            module.groups, module.first = groups, first_rank
        elif isinstance(module, GhostBatchNorm):
            per_slice = module.ranks_per_slice if groups > 1 else 1  # 1: back to one plain batch
            if groups % per_slice or first_rank % per_slice:
                raise ValueError(f"ranks {first_rank}.. ({groups}) split a group of {per_slice} ranks")
            module.groups, module.first = groups // per_slice, first_rank // per_slice
