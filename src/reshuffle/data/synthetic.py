"""Synthetic class-structured images: any size, shape and bytes per sample, generated offline.

Each class has a smooth random prototype; a sample is its class's prototype plus pixel noise, so
a small CNN learns it in an epoch or two while the label structure is real (label-sorted
partitions are as non-IID as on real data). ``sample_bytes`` pads every sample to a real
dataset's size (e.g. 110 KB for ImageNet) so that exchange and I/O costs become visible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from reshuffle.data.source import ArraySource

_CHUNK = 4096
_STREAMS = {"train": 1, "test": 2}


def load_synthetic(
    split: str,
    *,
    path: str | None = None,
    download: bool = False,
    num_samples: int = 4096,
    test_samples: int = 1024,
    num_classes: int = 10,
    shape: Sequence[int] = (1, 28, 28),
    sample_bytes: int | None = None,
    noise: float = 1.0,
    data_seed: int = 0,
) -> ArraySource:
    """``num_samples`` train (or ``test_samples`` test) images of ``shape`` in ``num_classes`` classes.

    Args:
        sample_bytes: bytes per stored sample, at least the pixels (``prod(shape)``); the rest
            is padding. None: just the pixels.
        noise: pixel noise relative to the prototypes' contrast; larger is harder.
        data_seed: the data's own seed (independent of the run's seed).
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"synthetic shape must be (channels, height, width), got {shape}")
    if num_classes < 1:
        raise ValueError(f"synthetic num_classes must be at least 1, got {num_classes}")
    pixels = int(np.prod(shape))
    if sample_bytes is not None and sample_bytes < pixels:
        raise ValueError(
            f"synthetic sample_bytes ({sample_bytes}) is less than the {pixels} pixel bytes of shape {shape}"
        )
    count = num_samples if split == "train" else test_samples
    if count < 1:
        raise ValueError(f"synthetic {split} size must be at least 1, got {count}")
    channels, height, width = shape
    coarse = np.random.default_rng((data_seed, 0)).standard_normal(
        (num_classes, channels, -(-height // 4), -(-width // 4))
    )
    prototypes = coarse.repeat(4, axis=2).repeat(4, axis=3)[:, :, :height, :width].astype(np.float32)
    rng = np.random.default_rng((data_seed, _STREAMS[split]))
    targets = rng.permutation(np.arange(count) % num_classes).astype(np.int64)
    images = np.empty((count, *shape), dtype=np.uint8)
    for start in range(0, count, _CHUNK):
        labels = targets[start : start + _CHUNK]
        values = prototypes[labels] + noise * rng.standard_normal((labels.size, *shape), dtype=np.float32)
        images[start : start + labels.size] = np.clip(128 + 40 * values, 0, 255).astype(np.uint8)
    padding = 0 if sample_bytes is None else sample_bytes - pixels
    return ArraySource("synthetic", split, images, targets, num_classes, padding=padding)
