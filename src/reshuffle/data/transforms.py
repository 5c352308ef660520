"""Image transforms on uint8 tensors (C, H, W), named in the system config.

A pipeline always starts by scaling to float in [0, 1]; then, in the order listed:

* ``normalize``: subtract the dataset's per-channel mean, divide by its std;
* ``random-crop:PAD``: zero-pad by PAD pixels and crop back at a random offset;
* ``horizontal-flip``: mirror with probability 1/2.

Random choices use torch's global generator, which DataLoader seeds per worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Transform = Callable[[torch.Tensor], torch.Tensor]


def _normalize(mean: Sequence[float], std: Sequence[float]) -> Transform:
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return lambda x: (x - mean_t) / std_t


def _random_crop(pad: int) -> Transform:
    def crop(x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        padded = F.pad(x, (pad, pad, pad, pad))
        top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
        return padded[..., top : top + height, left : left + width]

    return crop


def _horizontal_flip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1) if torch.rand(()) < 0.5 else x


def build_transform(names: Sequence[str], mean: Sequence[float], std: Sequence[float]) -> Transform:
    """The pipeline ``names`` describes (see the module docstring)."""
    steps: list[Transform] = []
    for name in names:
        kind, _, argument = name.partition(":")
        if kind == "normalize" and not argument:
            steps.append(_normalize(mean, std))
        elif kind == "random-crop" and argument.isdigit():
            steps.append(_random_crop(int(argument)))
        elif kind == "horizontal-flip" and not argument:
            steps.append(_horizontal_flip)
        else:
            raise ValueError(
                f"unknown transform {name!r}; use normalize, random-crop:PAD (e.g. random-crop:4) "
                "or horizontal-flip"
            )

    def apply(image: torch.Tensor) -> torch.Tensor:
        x = image.to(torch.float32).div_(255.0)
        for step in steps:
            x = step(x)
        return x

    return apply
