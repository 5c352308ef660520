"""A multi-layer perceptron over flattened images."""

from __future__ import annotations

import torch
from torch import nn

from reshuffle.models.norm import norm1d


class MLP(nn.Module):
    def __init__(
        self, inputs: int, num_classes: int, *, width: int = 256, norm: str = "batch", dropout: float = 0.0
    ):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(inputs, 2 * width),
            norm1d(norm, 2 * width),
            nn.ReLU(),
            nn.Linear(2 * width, width),
            norm1d(norm, width),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
