"""Models by name: ``small-cnn``, ``resnet18``, ``mlp``, or ``tv:<name>`` for a torchvision model.

``model.norm`` picks the normalisation layers (see :mod:`reshuffle.models.norm`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from reshuffle.config import ConfigError, ModelConfig
from reshuffle.models.mlp import MLP
from reshuffle.models.norm import replace_batchnorm
from reshuffle.models.resnet import ResNet18
from reshuffle.models.small_cnn import SmallCNN

BUILT_IN = ("small-cnn", "resnet18", "mlp")
TORCHVISION_PREFIX = "tv:"


class _RepeatChannels(nn.Module):
    """Grey images into a model that wants colour: repeat the channel."""

    def __init__(self, model: nn.Module, channels: int) -> None:
        super().__init__()
        self.model, self.channels = model, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.expand(-1, self.channels, -1, -1) if x.shape[1] == 1 else x)


def build_model(config: ModelConfig, shape: Sequence[int], num_classes: int) -> nn.Module:
    """The model ``config`` names, for inputs of ``shape`` (C, H, W) and ``num_classes`` outputs."""
    channels = int(shape[0])
    norm, dropout = config.norm, config.dropout
    if config.name == "small-cnn":
        return SmallCNN(channels, num_classes, width=config.width, norm=norm, dropout=dropout)
    if config.name == "resnet18":
        return ResNet18(channels, num_classes, width=config.width, norm=norm, dropout=dropout)
    if config.name == "mlp":
        inputs = int(torch.Size(shape).numel())
        return MLP(inputs, num_classes, width=config.width, norm=norm, dropout=dropout)
    if config.name.startswith(TORCHVISION_PREFIX):
        return _torchvision(config.name.removeprefix(TORCHVISION_PREFIX), channels, num_classes, config.norm)
    raise ConfigError(
        f"model.name: unknown model {config.name!r}; choose one of {', '.join(BUILT_IN)} "
        f"or {TORCHVISION_PREFIX}<torchvision model name> (e.g. {TORCHVISION_PREFIX}resnet50)"
    )


def _torchvision(name: str, channels: int, num_classes: int, norm: str) -> nn.Module:
    try:
        import torchvision
    except ImportError as error:
        raise ConfigError(
            f"model.name: {TORCHVISION_PREFIX}{name} needs torchvision: pip install torchvision "
            "(or reshuffle[vision])"
        ) from error
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    except ValueError:
        known = ", ".join(sorted(torchvision.models.list_models())[:8])
        raise ConfigError(
            f"model.name: torchvision has no model {name!r} "
            f"(e.g. {known}, ...; see torchvision.models.list_models())"
        ) from None
    model = replace_batchnorm(model, norm)
    return _RepeatChannels(model, 3) if channels == 1 else model


__all__ = ["BUILT_IN", "build_model"]
