"""Image transforms on uint8 tensors (C, H, W), named in the system config.

A pipeline always starts by scaling to float in [0, 1]; then, in the order listed:

* ``normalize``: subtract the dataset's per-channel mean, divide by its std;
* ``random-crop:PAD``: zero-pad by PAD pixels and crop back at a random offset;
* ``horizontal-flip``: mirror with probability 1/2.

Random choices come from the stream passed in, which the datasets key by (seed, epoch,
sample id): a sample is augmented the same way whichever worker, rank or resumed run reads it.
Every step is a small class, so pipelines pickle into spawned DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

_MASK = 2**64 - 1


class Step(Protocol):
    """One step of a :class:`Pipeline`: a function of a float image (and, if ``random``, a
    per-sample random stream)."""

    random: bool

    def __call__(self, x: np.ndarray, rng: SampleRandom | None = None) -> np.ndarray: ...


class SampleRandom:
    """A small deterministic random stream (splitmix64) for one sample: cheap to create per sample.

    A ``torch.Generator`` costs tens of microseconds to seed and per draw here, more than the
    transforms themselves; this costs about one.
    """

    def __init__(self, key: int) -> None:
        self.state = key & _MASK

    def _next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)

    def integers(self, high: int) -> int:
        """An integer in [0, high)."""
        return self._next() % high

    def random(self) -> float:
        """A float in [0, 1)."""
        return (self._next() >> 11) / 2**53


class Normalize:
    random = False

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        self.scale = (1.0 / np.asarray(std, dtype=np.float32)).reshape(-1, 1, 1)

    def __call__(self, x: np.ndarray, rng: SampleRandom | None = None) -> np.ndarray:
        x -= self.mean
        x *= self.scale
        return x


class RandomCrop:
    random = True

    def __init__(self, pad: int) -> None:
        self.pad = pad

    def __call__(self, x: np.ndarray, rng: SampleRandom | None = None) -> np.ndarray:
        if rng is None:
            raise ValueError("random-crop needs a per-sample random stream")
        pad, (height, width) = self.pad, x.shape[-2:]
        padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
        top, left = rng.integers(2 * pad + 1), rng.integers(2 * pad + 1)
        return padded[:, top : top + height, left : left + width]


class HorizontalFlip:
    random = True

    def __call__(self, x: np.ndarray, rng: SampleRandom | None = None) -> np.ndarray:
        if rng is None:
            raise ValueError("horizontal-flip needs a per-sample random stream")
        return x[..., ::-1] if rng.random() < 0.5 else x


class Pipeline:
    """uint8 image (C, H, W) -> float32 in [0, 1] -> each step in order -> a torch tensor.

    Steps work on numpy arrays: per-sample torch calls cost more than the arithmetic here.
    """

    def __init__(self, steps: Sequence[Step]) -> None:
        self.steps = list(steps)
        self.random = any(step.random for step in self.steps)

    def __call__(self, image: torch.Tensor | np.ndarray, rng: SampleRandom | None = None) -> torch.Tensor:
        pixels = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        x = pixels.astype(np.float32)
        x *= np.float32(1 / 255)
        for step in self.steps:
            x = step(x, rng)
        return torch.from_numpy(np.ascontiguousarray(x))

    def batch(self, images: np.ndarray, rngs: Sequence[SampleRandom] | None = None) -> torch.Tensor:
        """The pipeline on a uint8 batch (B, C, H, W): one vectorised pass when nothing is random,
        otherwise sample by sample with ``rngs[i]``; equal to calling it on each sample."""
        x = images.astype(np.float32)
        x *= np.float32(1 / 255)
        if not self.random:
            for step in self.steps:
                x = step(x, None)
            return torch.from_numpy(np.ascontiguousarray(x))
        if rngs is None or len(rngs) != len(x):
            raise ValueError("a random pipeline needs one random stream per sample")
        out = []
        for sample, rng in zip(x, rngs, strict=True):
            for step in self.steps:
                sample = step(sample, rng)
            out.append(sample)
        return torch.from_numpy(np.stack(out))


def sample_generator(seed: int, epoch: int, sample_id: int) -> SampleRandom:
    """The random stream that augments ``sample_id`` in ``epoch``: the same in every process."""
    key = ((seed * 1_000_003 + epoch) * 1_000_000_007 + sample_id) % (2**63 - 1)
    return SampleRandom(key)


Transform = Pipeline


def build_transform(names: Sequence[str], mean: Sequence[float], std: Sequence[float]) -> Pipeline:
    """The pipeline ``names`` describes (see the module docstring)."""
    steps: list[Step] = []
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
