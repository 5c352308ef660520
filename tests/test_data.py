from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from reshuffle.config import ConfigError, DataConfig, DatasetEntry, SyntheticConfig, SystemConfig
from reshuffle.data import LOADERS, DataNotFoundError, SourceDataset, open_source, transform_for
from reshuffle.data.cifar10 import load_cifar10
from reshuffle.data.fashion_mnist import load_fashion_mnist
from reshuffle.data.idx import read_idx
from reshuffle.data.imagefolder import load_imagefolder
from reshuffle.data.synthetic import load_synthetic
from reshuffle.data.transforms import build_transform, sample_generator


def write_idx(path: Path, array: np.ndarray, *, compress: bool = False) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def fake_fashion_mnist(directory: Path, train: int = 30, test: int = 10) -> None:
    rng = np.random.default_rng(0)
    for prefix, count in (("train", train), ("t10k", test)):
        write_idx(
            directory / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)), compress=True
        )
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", np.arange(count) % 10)


def test_idx_reads_plain_and_gzip_and_rejects_damage(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    plain = write_idx(tmp_path / "a", array)
    packed = write_idx(tmp_path / "b", array, compress=True)
    assert np.array_equal(read_idx(plain), array) and np.array_equal(read_idx(packed), array)
    plain.write_bytes(plain.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated or padded"):
        read_idx(plain)
    plain.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(plain)


def test_fashion_mnist_from_a_configured_directory(tmp_path):
    fake_fashion_mnist(tmp_path)
    train, test = (
        load_fashion_mnist("train", path=str(tmp_path)),
        load_fashion_mnist("test", path=str(tmp_path)),
    )
    assert (len(train), len(test), train.shape, train.num_classes) == (30, 10, (1, 28, 28), 10)
    assert train.decode(train.raw(4)).equal(train.image(4))
    assert train.targets[:3].tolist() == [0, 1, 2]


def test_missing_fashion_mnist_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr("reshuffle.data.fashion_mnist.DEBIAN_PATH", str(tmp_path / "absent"))
    with pytest.raises(DataNotFoundError) as error:
        load_fashion_mnist("train")
    message = str(error.value)
    assert str(tmp_path / "absent") in message
    assert "apt-get install dataset-fashion-mnist" in message and "datasets.fashion-mnist.path" in message


def test_a_configured_fashion_mnist_path_that_holds_nothing_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    """The system config names a directory without the files while the Debian package's copy
    exists: an error naming the configured path (it used to load the Debian copy silently)."""
    (tmp_path / "debian").mkdir()
    fake_fashion_mnist(tmp_path / "debian")
    monkeypatch.setattr("reshuffle.data.fashion_mnist.DEBIAN_PATH", str(tmp_path / "debian"))
    assert len(load_fashion_mnist("train")) == 30  # the default place still works
    with pytest.raises(DataNotFoundError, match=str(tmp_path / "mine")) as error:
        load_fashion_mnist("train", path=str(tmp_path / "mine"))
    assert str(tmp_path / "debian") not in str(error.value)


def test_real_fashion_mnist(fashion_mnist):
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    assert (len(train), len(test)) == (60_000, 10_000)
    assert np.bincount(train.targets).tolist() == [6000] * 10
    assert train.image(0).dtype == torch.uint8 and train.image(0).shape == (1, 28, 28)
    assert 50 < train.images.mean() < 100  # real images, not zeros


def write_cifar_batch(path: Path, count: int, offset: int = 0) -> None:
    rng = np.random.default_rng(offset)
    batch = {
        b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
        b"labels": [(offset + i) % 10 for i in range(count)],
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar10_python_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for i in range(1, 6):
        write_cifar_batch(root / f"data_batch_{i}", 4, offset=i * 4)
    write_cifar_batch(root / "test_batch", 3)
    train = load_cifar10("train", path=str(tmp_path))  # the parent directory works too
    test = load_cifar10("test", path=str(root))
    assert (len(train), len(test), train.shape) == (20, 3, (3, 32, 32))
    assert train.targets.tolist() == [(4 + i) % 10 for i in range(20)]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar10_refuses_pickles_that_would_run_code(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    (root / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load posix\.system"):
        load_cifar10("test", path=str(root))
    with pytest.raises(DataNotFoundError, match="data_batch_1"):
        load_cifar10("train", path=str(root))


def test_imagefolder_decodes_and_resizes_at_read_time(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for label, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40 + i, 30), color).save(folder / f"{i}.png")
    train = load_imagefolder("train", path=str(tmp_path), image_size=16)
    test = load_imagefolder("test", path=str(tmp_path), image_size=16)  # val/ serves as test
    assert train.classes == ["cat", "dog"] and len(train) == 6 and len(test) == 6
    image = train.decode(train.raw(0))
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
    assert image[0].float().mean() > 250 and image[2].float().mean() < 5  # red cat
    grey = load_imagefolder("train", path=str(tmp_path), image_size=8, channels=1)
    assert grey.image(5).shape == (1, 8, 8)
    with pytest.raises(DataNotFoundError, match="imagefolder train split not found"):
        load_imagefolder("train", path=str(tmp_path / "val"))


def test_digits_ships_with_scikit_learn():
    train, test = LOADERS["digits"]("train"), LOADERS["digits"]("test")
    assert (len(train), len(test), train.shape) == (1437, 360, (1, 8, 8))
    assert train.images.max() > 200


def test_synthetic_is_deterministic_learnable_and_padded():
    a = load_synthetic(
        "train", num_samples=500, num_classes=5, shape=(3, 8, 8), sample_bytes=300, data_seed=4
    )
    b = load_synthetic(
        "train", num_samples=500, num_classes=5, shape=(3, 8, 8), sample_bytes=300, data_seed=4
    )
    assert np.array_equal(a.images, b.images) and np.array_equal(a.targets, b.targets)
    assert len(a.raw(7)) == 300 and a.decode(a.raw(7)).equal(a.image(7))
    assert np.bincount(a.targets).tolist() == [100] * 5
    # Class structure: a nearest-class-mean classifier separates the classes.
    flat = a.images.reshape(500, -1).astype(float)
    means = np.stack([flat[a.targets == c].mean(0) for c in range(5)])
    predicted = np.argmin(((flat[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (predicted == a.targets).mean() > 0.9
    with pytest.raises(ValueError, match="sample_bytes \\(10\\) is less than the 192 pixel bytes"):
        load_synthetic("train", shape=(3, 8, 8), sample_bytes=10)


def test_open_source_applies_limits_and_options():
    system = SystemConfig()
    data = DataConfig(
        name="synthetic", train_limit=100, synthetic=SyntheticConfig(num_samples=300, test_samples=50)
    )
    train, test = open_source(data, "train", system), open_source(data, "test", system)
    assert (len(train), len(test)) == (100, 50)
    dataset = SourceDataset(train, transform_for(data, "train", system))
    image, label, index = dataset[42]
    assert image.dtype == torch.float32 and index == 42 and label == int(train.targets[42])
    bad = SystemConfig(datasets={"synthetic": DatasetEntry(loader="synthetic", options={"colour": 1})})
    with pytest.raises(ConfigError, match=r"datasets\.synthetic\.options"):
        open_source(data, "train", bad)
    with pytest.raises(ConfigError, match="unknown loader 'hdf5'"):
        open_source(DataConfig(name="x"), "train", SystemConfig(datasets={"x": DatasetEntry(loader="hdf5")}))


def test_transforms_normalize_crop_and_flip():
    torch.manual_seed(0)
    image = torch.arange(16, dtype=torch.uint8).view(1, 4, 4) * 16
    normalized = build_transform(["normalize"], [0.5], [0.25])(image)
    assert torch.allclose(normalized, (image / 255.0 - 0.5) / 0.25)
    cropped = build_transform(["random-crop:2"], [0], [1])(image, sample_generator(0, 0, 0))
    assert cropped.shape == (1, 4, 4)
    flip = build_transform(["horizontal-flip"], [0], [1])
    corners = {round(flip(image, sample_generator(0, 0, i))[0, 0, 0].item() * 255) for i in range(20)}
    assert corners == {0, int(image[0, 0, 3])}  # both orientations occur
    augment = build_transform(["random-crop:2", "horizontal-flip"], [0], [1])
    keyed = [augment(image, sample_generator(1, 2, 3)) for _ in range(2)]
    assert torch.equal(keyed[0], keyed[1])  # the same key augments the same way
    assert any(not torch.equal(keyed[0], augment(image, sample_generator(1, e, 3))) for e in range(3, 10))
    with pytest.raises(ValueError, match="horizontal-flip needs a per-sample random stream"):
        flip(image)
    with pytest.raises(ValueError, match="unknown transform 'rotate'"):
        build_transform(["rotate"], [0], [1])
