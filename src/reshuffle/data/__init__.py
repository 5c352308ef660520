"""Datasets as :class:`~reshuffle.data.source.SampleSource`: labels, raw bytes, decoding.

``LOADERS`` maps a loader name to a function ``loader(split, *, path, download, **options)``.
The system config's dataset registry names which loader (and path, options, transforms) a
dataset name uses; the built-in names work without one.
"""

from __future__ import annotations

from collections.abc import Callable

from reshuffle.data.cifar10 import load_cifar10
from reshuffle.data.digits import load_digits
from reshuffle.data.fashion_mnist import load_fashion_mnist
from reshuffle.data.imagefolder import load_imagefolder
from reshuffle.data.shards import load_arrow, load_parquet, load_webdataset
from reshuffle.data.source import ArraySource, DataNotFoundError, SampleSource
from reshuffle.data.synthetic import load_synthetic

# Imported after LOADERS exists: dataset.py looks loaders up here.

LOADERS: dict[str, Callable[..., SampleSource]] = {
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "digits": load_digits,
    "imagefolder": load_imagefolder,
    "webdataset": load_webdataset,
    "parquet": load_parquet,
    "arrow": load_arrow,
    "synthetic": load_synthetic,
}

from reshuffle.data.dataset import SourceDataset, open_source, transform_for  # noqa: E402

__all__ = [
    "LOADERS",
    "ArraySource",
    "DataNotFoundError",
    "SampleSource",
    "SourceDataset",
    "open_source",
    "transform_for",
]
