"""Datasets as :class:`~reshuffle.data.source.SampleSource`: labels, raw bytes, decoding.

``LOADERS`` maps a loader name to a function ``loader(split, *, path, download, **options)``.
The system config's dataset registry names which loader (and path, options, transforms) a
dataset name uses; the built-in names work without one.
"""

from __future__ import annotations

from reshuffle.data.dataset import SourceDataset, open_source, transform_for
from reshuffle.data.loaders import LOADERS
from reshuffle.data.source import ArraySource, DataNotFoundError, SampleSource

__all__ = [
    "LOADERS",
    "ArraySource",
    "DataNotFoundError",
    "SampleSource",
    "SourceDataset",
    "open_source",
    "transform_for",
]
