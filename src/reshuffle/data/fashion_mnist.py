"""Fashion-MNIST from its four IDX files (Debian: ``apt-get install dataset-fashion-mnist``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reshuffle.data.idx import read_idx
from reshuffle.data.source import ArraySource, DataNotFoundError

DEBIAN_PATH = "/usr/share/datasets/fashion-mnist"
_PREFIX = {"train": "train", "test": "t10k"}


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _candidates(path: str | None) -> list[Path]:
    # a configured path is the only place looked in: falling back would train on other files
    roots = [Path(path).expanduser()] if path else [Path(DEBIAN_PATH)]
    # torchvision's download layout, when it was used to fetch the files
    return [p for root in roots for p in (root, root / "FashionMNIST" / "raw")]


def load_fashion_mnist(split: str, *, path: str | None = None, download: bool = False) -> ArraySource:
    """Fashion-MNIST ``split`` (60,000 train or 10,000 test 28x28 grey images, 10 classes).

    Looks in ``path`` (the system config's ``datasets.fashion-mnist.path``) when it is set, else in
    the Debian package's directory. With ``download`` and torchvision installed it fetches the files into
    ``path`` first.
    """
    prefix = _PREFIX[split]
    if download and path:
        from torchvision.datasets import FashionMNIST  # optional; needs internet access

        FashionMNIST(path, train=split == "train", download=True)
    for directory in _candidates(path):
        images = _find(directory, f"{prefix}-images-idx3-ubyte")
        labels = _find(directory, f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            pixels = read_idx(images)
            targets = read_idx(labels).astype(np.int64)
            if pixels.shape[0] != targets.shape[0]:
                raise ValueError(f"{images} and {labels} hold different numbers of samples; re-download them")
            return ArraySource("fashion-mnist", split, pixels[:, None, :, :], targets, num_classes=10)
    looked = ", ".join(str(p) for p in _candidates(path))
    raise DataNotFoundError(
        f"Fashion-MNIST {split} files ({prefix}-images-idx3-ubyte[.gz], {prefix}-labels-idx1-ubyte[.gz]) "
        f"not found; looked in: {looked}. Install them with `apt-get install dataset-fashion-mnist`, or "
        "download them from https://github.com/zalandoresearch/fashion-mnist and set "
        "datasets.fashion-mnist.path in the system config (with internet access, `download: true` "
        "fetches them through torchvision)."
    )
