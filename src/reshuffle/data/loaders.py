"""``LOADERS``: a loader name -> ``loader(split, *, path, download, **options)``, one per dataset
format. The system config's dataset registry names which loader a dataset name uses."""

from __future__ import annotations

from collections.abc import Callable

from reshuffle.data.cifar10 import load_cifar10
from reshuffle.data.digits import load_digits
from reshuffle.data.fashion_mnist import load_fashion_mnist
from reshuffle.data.imagefolder import load_imagefolder
from reshuffle.data.shards import load_arrow, load_parquet, load_webdataset
from reshuffle.data.source import SampleSource
from reshuffle.data.synthetic import load_synthetic

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
