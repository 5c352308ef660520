"""CIFAR-10 from its python batches (``cifar-10-batches-py``), unpickled without running code.

The batches are pickled dicts of numpy arrays. Plain ``pickle.load`` would execute whatever a
tampered file asks for, so :class:`_ArraysOnly` admits only the few globals numpy arrays need.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from reshuffle.data.source import ArraySource, DataNotFoundError

_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} from a CIFAR batch (only numpy arrays)"
        )


def load_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 3, 32, 32), labels int64 (n,)) from one python batch file."""
    with open(path, "rb") as handle:
        batch = _ArraysOnly(io.BytesIO(handle.read()), encoding="bytes").load()
    if not isinstance(batch, dict):
        raise ValueError(f"{path} is not a CIFAR-10 python batch (expected a dict)")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path} has no 'data'/'labels' entries; is it a CIFAR-10 python batch?")
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != data.shape[0]:
        raise ValueError(f"{path} holds data of shape {data.shape} with {len(labels)} labels, not CIFAR-10's")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def load_cifar10(split: str, *, path: str | None = None, download: bool = False) -> ArraySource:
    """CIFAR-10 ``split`` (50,000 train or 10,000 test 32x32 colour images, 10 classes).

    ``path`` is the ``cifar-10-batches-py`` directory or its parent. With ``download`` and
    torchvision installed the batches are fetched into ``path`` first.
    """
    if path is None:
        raise DataNotFoundError(
            "CIFAR-10 needs a path: set datasets.cifar10.path in the system config to the "
            "cifar-10-batches-py directory (from https://www.cs.toronto.edu/~kriz/cifar.html)"
        )
    root = Path(path).expanduser()
    if download:
        from torchvision.datasets import CIFAR10  # optional; needs internet access

        CIFAR10(str(root), train=split == "train", download=True)
    for directory in (root, root / "cifar-10-batches-py"):
        files = [directory / name for name in _FILES[split]]
        if all(f.is_file() for f in files):
            parts = [load_batch(f) for f in files]
            images = np.concatenate([p[0] for p in parts])
            targets = np.concatenate([p[1] for p in parts])
            return ArraySource("cifar10", split, images, targets, num_classes=10)
    raise DataNotFoundError(
        f"CIFAR-10 {split} batches ({', '.join(_FILES[split])}) not found in {root} or "
        f"{root / 'cifar-10-batches-py'}; download the python version from "
        "https://www.cs.toronto.edu/~kriz/cifar.html and unpack it there (with internet access, "
        "`download: true` fetches it through torchvision)"
    )
