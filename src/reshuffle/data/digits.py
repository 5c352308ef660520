"""scikit-learn's bundled ``digits`` (1,797 8x8 grey images, 10 classes): real data, no files."""

from __future__ import annotations

import numpy as np

from reshuffle.data.source import ArraySource


def load_digits(split: str, *, path: str | None = None, download: bool = False) -> ArraySource:
    """Every fifth sample is the test split (360), the rest train (1,437); pixels scaled to 0..255."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn") from error
    bunch = sklearn_digits()
    images = np.clip(bunch.images * 16, 0, 255).astype(np.uint8)[:, None, :, :]
    targets = bunch.target.astype(np.int64)
    test = np.arange(targets.size) % 5 == 0
    keep = test if split == "test" else ~test
    return ArraySource("digits", split, images[keep], targets[keep], num_classes=10)
