"""Image transforms on uint8 tensors (C, H, W), named in the system config.

A pipeline always starts by scaling to float in [0, 1]; then, in the order listed:

* ``normalize``: subtract the dataset's per-channel mean, divide by its std;
* ``random-crop:PAD``: zero-pad by PAD pixels and crop back at a random offset;
* ``horizontal-flip``: mirror with probability 1/2.

Random choices come from the generator passed in, which the datasets seed from (seed, epoch,
sample id): a sample is augmented the same way whichever worker, rank or resumed run reads it.
Every step is a small class, so pipelines pickle into spawned DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    random = False

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return (x - self.mean) / self.std


class RandomCrop:
    random = True

    def __init__(self, pad: int) -> None:
        self.pad = pad

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        height, width = x.shape[-2:]
        padded = F.pad(x, (self.pad, self.pad, self.pad, self.pad))
        top, left = (int(v) for v in torch.randint(0, 2 * self.pad + 1, (2,), generator=generator))
        return padded[..., top : top + height, left : left + width]


class HorizontalFlip:
    random = True

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return x.flip(-1) if torch.rand((), generator=generator) < 0.5 else x


class Pipeline:
    """uint8 image -> float in [0, 1] -> each step in order."""

    def __init__(self, steps: Sequence[object]) -> None:
        self.steps = list(steps)
        self.random = any(step.random for step in self.steps)

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = image.to(torch.float32).div_(255.0)
        for step in self.steps:
            x = step(x, generator)
        return x


def sample_generator(seed: int, epoch: int, sample_id: int) -> torch.Generator:
    """The generator that augments ``sample_id`` in ``epoch``: same numbers in every process."""
    key = ((seed * 1_000_003 + epoch) * 1_000_000_007 + sample_id) % (2**63 - 1)
    return torch.Generator().manual_seed(key)


Transform = Pipeline


def build_transform(names: Sequence[str], mean: Sequence[float], std: Sequence[float]) -> Pipeline:
    """The pipeline ``names`` describes (see the module docstring)."""
    steps: list[object] = []
    for name in names:
        kind, _, argument = name.partition(":")
        if kind == "normalize" and not argument:
            steps.append(Normalize(mean, std))
        elif kind == "random-crop" and argument.isdigit():
            steps.append(RandomCrop(int(argument)))
        elif kind == "horizontal-flip" and not argument:
            steps.append(HorizontalFlip())
        else:
            raise ValueError(
                f"unknown transform {name!r}; use normalize, random-crop:PAD (e.g. random-crop:4) "
                "or horizontal-flip"
            )
    return Pipeline(steps)
