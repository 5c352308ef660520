"""Any class-per-folder image tree: ``root/{train,test}/<class>/<image>`` (``val`` also works).

Raw bytes are the image files as stored (JPEG, PNG, ...), exactly what a node-local store would
hold; decoding (Pillow) and resizing to ``image_size`` happen at read time.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reshuffle.data.source import DataNotFoundError, SampleSource

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
_SPLIT_DIRS = {"train": ("train",), "test": ("test", "val")}


class ImageFolderSource(SampleSource):
    """Images of ``root/<split>/<class>/``; classes are the sorted folder names."""

    def __init__(self, directory: Path, split: str, image_size: int, channels: int) -> None:
        if channels not in (1, 3):
            raise ValueError(f"imagefolder channels must be 1 or 3, got {channels}")
        self.name = "imagefolder"
        self.split = split
        self.classes = sorted(d.name for d in directory.iterdir() if d.is_dir())
        files, targets = [], []
        for label, name in enumerate(self.classes):
            found = sorted(p for p in (directory / name).rglob("*") if p.suffix.lower() in EXTENSIONS)
            files += found
            targets += [label] * len(found)
        if not files:
            raise DataNotFoundError(
                f"no images ({', '.join(EXTENSIONS)}) under {directory}/<class>/; "
                "expected one folder per class"
            )
        self.files = files
        self.targets = np.asarray(targets, dtype=np.int64)
        self.num_classes = len(self.classes)
        self.mode = "L" if channels == 1 else "RGB"
        self.shape = (channels, image_size, image_size)

    def raw(self, index: int) -> bytes:
        return self.files[index].read_bytes()

    @property
    def decoder(self) -> PillowDecoder:
        return PillowDecoder(self.mode, self.shape[1], self.shape[2])


@dataclass(frozen=True)
class PillowDecoder:
    """Encoded image file bytes -> uint8 tensor (C, height, width), via Pillow."""

    mode: str  # "L" or "RGB"
    height: int
    width: int

    def __call__(self, raw: bytes | memoryview) -> torch.Tensor:
        from PIL import Image

        with Image.open(io.BytesIO(raw)) as image:
            picture = image.convert(self.mode).resize((self.width, self.height), Image.Resampling.BILINEAR)
            array = np.asarray(picture, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array.transpose(2, 0, 1).copy())


def load_imagefolder(
    split: str, *, path: str | None = None, download: bool = False, image_size: int = 32, channels: int = 3
) -> ImageFolderSource:
    """The ``split`` of the tree at ``path``, images resized to ``image_size`` squared."""
    if path is None:
        raise DataNotFoundError(
            "imagefolder needs a path: set datasets.<name>.path in the system config to a directory "
            "holding train/<class>/*.jpg and test/<class>/*.jpg (or val/)"
        )
    try:
        import PIL  # noqa: F401
    except ImportError as error:
        raise ImportError("imagefolder needs Pillow to decode images: pip install pillow") from error
    root = Path(path).expanduser()
    for name in _SPLIT_DIRS[split]:
        if (root / name).is_dir():
            return ImageFolderSource(root / name, split, image_size, channels)
    raise DataNotFoundError(
        f"imagefolder {split} split not found: expected "
        f"{' or '.join(str(root / n) for n in _SPLIT_DIRS[split])} "
        "with one folder per class"
    )
