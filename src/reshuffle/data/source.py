"""A dataset in the form both executors need: labels, raw sample bytes, and how to decode them.

Store mode keeps and exchanges a sample's *raw bytes* (what a node-local SSD would hold), and
decodes at read time; index mode reads the same bytes straight from the source. So every
dataset is a :class:`SampleSource`: ``raw(i)`` gives the bytes, ``decode(raw)`` the image tensor
(uint8, channels first), and both modes feed the model identical tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray


class SampleSource:
    """Base class. Subclasses set the attributes below and implement :meth:`raw` and :meth:`decode`.

    Attributes:
        name: the dataset's registry name.
        split: ``"train"`` or ``"test"``.
        targets: int64 class per sample, shape (N,).
        num_classes: C.
        shape: shape of a decoded sample, e.g. (1, 28, 28).
    """

    name: str
    split: str
    targets: NDArray[np.int64]
    num_classes: int
    shape: tuple[int, ...]

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def raw(self, index: int) -> bytes:
        """The stored bytes of sample ``index``."""
        raise NotImplementedError

    def decode(self, raw: bytes) -> torch.Tensor:
        """The uint8 tensor of shape :attr:`shape` that ``raw`` encodes."""
        return self.decoder(raw)

    @property
    def decoder(self) -> Callable[[bytes | memoryview], torch.Tensor]:
        """A small picklable callable doing :meth:`decode` without holding the dataset (what
        store-mode DataLoader workers receive)."""
        raise NotImplementedError

    def image(self, index: int) -> torch.Tensor:
        """Decoded sample ``index`` (subclasses with the pixels in memory skip the bytes)."""
        return self.decode(self.raw(index))

    def images_at(self, indices: Sequence[int] | NDArray[np.int64]) -> np.ndarray:
        """Decoded samples ``indices`` as one uint8 array (B, *shape)."""
        return np.stack([self.image(int(i)).numpy() for i in indices])


@dataclass
class ArraySource(SampleSource):
    """Samples held in memory as one uint8 array (N, *shape); raw bytes are a row's bytes.

    ``padding`` extra bytes per sample (derived from the id, ignored by decoding) make samples
    as large as a real dataset's, so exchange costs show up in synthetic experiments.
    """

    name: str
    split: str
    images: NDArray[np.uint8]
    targets: NDArray[np.int64]
    num_classes: int
    padding: int = 0

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.shape[0] != self.targets.shape[0]:
            raise ValueError("images must be uint8 with one row per target")
        if not self.images.flags.writeable or not self.images.flags.c_contiguous:
            self.images = np.array(self.images, order="C")  # torch tensors need writable memory
        self.targets = self.targets.astype(np.int64)
        self.shape = tuple(int(d) for d in self.images.shape[1:])
        self._image_bytes = int(np.prod(self.shape))

    @property
    def sample_bytes(self) -> int:
        """Length of :meth:`raw` for every sample."""
        return self._image_bytes + self.padding

    def raw(self, index: int) -> bytes:
        pixels = self.images[index].tobytes()
        if not self.padding:
            return pixels
        filler = np.full(-(-self.padding // 8), index, dtype="<i8").tobytes()[: self.padding]
        return pixels + filler

    @property
    def decoder(self) -> PixelDecoder:
        return PixelDecoder(self.name, self.shape, self.sample_bytes)

    def image(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.images[index])

    def images_at(self, indices: Sequence[int] | NDArray[np.int64]) -> np.ndarray:
        return self.images[np.asarray(indices, dtype=np.int64)]


@dataclass(frozen=True)
class PixelDecoder:
    """Raw uint8 pixels (plus padding) -> tensor of ``shape``."""

    name: str
    shape: tuple[int, ...]
    sample_bytes: int

    def __call__(self, raw: bytes | memoryview) -> torch.Tensor:
        if len(raw) != self.sample_bytes:
            raise ValueError(f"a {self.name} sample is {self.sample_bytes} bytes, got {len(raw)}")
        pixels = np.frombuffer(raw, dtype=np.uint8, count=math.prod(self.shape)).reshape(self.shape)
        return torch.from_numpy(pixels.copy())  # raw may be a view of a store's pack: copied out

    def batch(self, raw: np.ndarray) -> np.ndarray:
        """Many samples' bytes, one per row (B, sample_bytes) -> uint8 images (B, *shape)."""
        if raw.ndim != 2 or raw.shape[1] != self.sample_bytes:
            raise ValueError(
                f"a {self.name} sample is {self.sample_bytes} bytes, got rows of {raw.shape[1:]}"
            )
        return raw[:, : math.prod(self.shape)].reshape(raw.shape[0], *self.shape)


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message says where we looked and how to get them."""
