"""Normalisation layers as a model option (``model.norm``), and BatchNorm helpers.

Why it is an option: under DDP with plain BatchNorm every rank normalises with the statistics of
its own batch, so on non-IID partitions (label-sorted) the ranks' features drift apart and the
broadcast running statistics (rank 0's) fit nobody; SyncBatchNorm (statistics over all ranks),
GroupNorm (no batch statistics) or no normalisation remove that effect.
"""

from __future__ import annotations

from torch import nn

NORMS = ("batch", "sync-batch", "group", "none")


def norm2d(kind: str, channels: int) -> nn.Module:
    """A normalisation layer for (N, C, H, W) activations. ``sync-batch`` builds a BatchNorm2d
    that :func:`convert_sync` later turns into SyncBatchNorm under DDP."""
    if kind in ("batch", "sync-batch"):
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(_groups(channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown model.norm {kind!r}; choose one of {', '.join(NORMS)}")


def norm1d(kind: str, features: int) -> nn.Module:
    """The same for (N, C) features."""
    if kind in ("batch", "sync-batch"):
        return nn.BatchNorm1d(features)
    if kind == "group":
        return nn.GroupNorm(_groups(features), features)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown model.norm {kind!r}; choose one of {', '.join(NORMS)}")


def _groups(channels: int) -> int:
    """Up to 32 groups that divide ``channels`` (GroupNorm's usual choice)."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


def replace_batchnorm(module: nn.Module, kind: str) -> nn.Module:
    """Swap every BatchNorm of a ready-made model (torchvision's) for the ``kind`` requested."""
    if kind in ("batch", "sync-batch"):
        return module
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, norm2d(kind, child.num_features) if kind == "group" else nn.Identity())
        else:
            replace_batchnorm(child, kind)
    return module


def batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm (including SyncBatchNorm) layer of ``module``."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
