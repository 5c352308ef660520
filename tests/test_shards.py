"""Shard formats (issue 22): WebDataset tar shards, Parquet files and Hugging Face's saved Arrow
files, built from Fashion-MNIST on the fly; labels indexed without decoding an image; the same
pixels as the IDX files; `reshuffle run` trains from each in index and store mode."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from reshuffle.data.fashion_mnist import load_fashion_mnist
from reshuffle.data.shards import load_arrow, load_parquet, load_webdataset
from reshuffle.data.source import DataNotFoundError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
COUNTS = {"train": 600, "test": 200}
PER_SHARD = 128


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels, "L").save(out, format="PNG")
    return out.getvalue()


def _samples(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    source = load_fashion_mnist(split, path=str(folder))
    count = COUNTS[split]
    return source.images[:count].reshape(count, 28, 28), source.targets[:count]


def write_tar_shards(folder: Path, root: Path) -> Path:
    """WebDataset layout: root/{train,test}/shard-00000.tar, members <key>.png and <key>.cls."""
    for split in COUNTS:
        images, labels = _samples(folder, split)
        (root / split).mkdir(parents=True)
        for first in range(0, len(labels), PER_SHARD):
            with tarfile.open(root / split / f"shard-{first // PER_SHARD:05d}.tar", "w") as archive:
                for i in range(first, min(first + PER_SHARD, len(labels))):
                    for name, payload in (
                        (f"{i:06d}.png", _png(images[i])),
                        (f"{i:06d}.cls", b"%d" % labels[i]),
                    ):
                        info = tarfile.TarInfo(name)
                        info.size = len(payload)
                        archive.addfile(info, io.BytesIO(payload))
    return root


def write_parquet(folder: Path, root: Path) -> Path:
    """Hugging Face's layout of an image dataset: an image struct column {bytes, path} and a label,
    several row groups per file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for split in COUNTS:
        images, labels = _samples(folder, split)
        (root / split).mkdir(parents=True)
        table = pa.table({
            "image": [{"bytes": _png(image), "path": None} for image in images],
            "label": labels.tolist(),
        })  # fmt: skip
        pq.write_table(table, root / split / "part-0.parquet", row_group_size=PER_SHARD)
    return root


def write_arrow(folder: Path, root: Path) -> Path:
    """What Hugging Face's save_to_disk writes for a DatasetDict: root/<split>/data-0000k-of-0000n.arrow
    (Arrow stream files, record batches of 100 rows), plus its json files (ignored)."""
    import pyarrow as pa

    for split in COUNTS:
        images, labels = _samples(folder, split)
        (root / split).mkdir(parents=True)
        (root / split / "state.json").write_text("{}")
        half = len(labels) // 2
        for part, rows in enumerate((range(half), range(half, len(labels)))):
            table = pa.table({
                "image": [{"bytes": _png(images[i]), "path": None} for i in rows],
                "label": pa.array([int(labels[i]) for i in rows], pa.int64()),
            })  # fmt: skip
            with pa.ipc.new_stream(root / split / f"data-{part:05d}-of-00002.arrow", table.schema) as out:
                out.write_table(table, max_chunksize=100)
    return root


WRITERS = {"webdataset": (write_tar_shards, load_webdataset), "parquet": (write_parquet, load_parquet),
           "arrow": (write_arrow, load_arrow)}  # fmt: skip


@pytest.mark.parametrize("kind", list(WRITERS))
def test_shards_give_the_idx_files_pixels_and_labels(fashion_mnist, tmp_path, kind):
    """Every sample decodes to exactly the IDX file's pixels with its label (PNG is lossless),
    read in any order; indexing reads labels only."""
    build, load = (
        (write_tar_shards, load_webdataset) if kind == "webdataset" else (write_parquet, load_parquet)
    )
    root = build(fashion_mnist, tmp_path / kind)
    source = load("train", path=str(root), image_size=28, channels=1)
    images, labels = _samples(fashion_mnist, "train")
    assert len(source) == 600 and source.num_classes == 10 and source.shape == (1, 28, 28)
    assert np.array_equal(source.targets, labels)
    for i in [*np.random.default_rng(0).permutation(600)[:50].tolist(), 599, 0]:
        assert np.array_equal(source.image(i).numpy()[0], images[i]), i
    assert len(load("test", path=str(root), image_size=28, channels=1)) == 200


def test_a_broken_shard_is_a_named_error(fashion_mnist, tmp_path):
    root = write_tar_shards(fashion_mnist, tmp_path / "wds")
    with tarfile.open(root / "train" / "shard-00005.tar", "a") as archive:
        info = tarfile.TarInfo("999999.png")
        info.size = 3
        archive.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(
        DataNotFoundError, match=r"shard-00005.tar: sample '999999' has an image but no \.cls"
    ):
        load_webdataset("train", path=str(root), image_size=28, channels=1)
    with pytest.raises(DataNotFoundError, match=r"expected .*/train/\*\.parquet"):
        load_parquet("train", path=str(root), image_size=28, channels=1)
    (root / "train" / "shard-00000.tar").write_bytes(b"not a tar file at all" * 40)
    with pytest.raises(DataNotFoundError, match="is not an uncompressed tar file"):
        load_webdataset("train", path=str(root), image_size=28, channels=1)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(WRITERS))
@pytest.mark.parametrize("mode", ["index", "store"])
def test_reshuffle_run_trains_from_shards(fashion_mnist, tmp_path, kind, mode):
    """A system config points a dataset name at a folder of shards; 2 ranks train one epoch."""
    root = WRITERS[kind][0](fashion_mnist, tmp_path / "data")
    system = tmp_path / "system.yaml"
    system.write_text(
        f"datasets:\n  fm-shards:\n    loader: {kind}\n    path: {root}\n"
        "    options: {image_size: 28, channels: 1}\n    mean: [0.2860]\n    std: [0.3530]\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "reshuffle", "run", str(CONFIGS / "fashion-mnist.yaml"), "--nproc", "2",
         "--system", str(system), "data.name=fm-shards", f"shuffle.mode={mode}", "train.epochs=2",
         f"log.dir={tmp_path / 'runs'}", "name=shards", "log.tensorboard=false", "train.batch_size=32"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final test accuracy" in result.stdout


def _stage_counting_reads(rank, world, root, store_root):
    """One rank: open the shards, stage its store collectively, and report which shards it read."""
    from reshuffle import ShufflePlanner
    from reshuffle.store import open_or_stage

    source = load_webdataset("train", path=str(root), image_size=28, channels=1)
    read_shards = []
    raw = source.raw

    def counting(index):
        read_shards.append(int(source.shard_index[index]))
        return raw(index)

    source.raw = counting
    planner = ShufflePlanner(len(source), world, strategy="partial", fraction=0.2, partition="label-sorted",
                             labels=source.targets, seed=3)  # fmt: skip
    store, message = open_or_stage(store_root, rank, source, planner, 0)
    return sorted(set(read_shards)), len(read_shards), store.ids.tolist(), message


@pytest.mark.slow
def test_staging_reads_each_shard_once_and_forwards_what_other_ranks_hold(fashion_mnist, tmp_path):
    """3 ranks stage label-sorted stores from 5 tar shards: shard s is read by rank s mod 3 alone,
    every sample exactly once over all ranks, and each store holds exactly the plan's samples,
    their bytes intact. A second staging finds the stores and reads nothing."""
    from reshuffle import ShufflePlanner
    from reshuffle.store import RankStore, verify_store
    from spawn import run_ranks

    root = write_tar_shards(fashion_mnist, tmp_path / "wds")
    results = run_ranks(_stage_counting_reads, 3, str(root), str(tmp_path / "store"), timeout=240)
    source = load_webdataset("train", path=str(root), image_size=28, channels=1)
    planner = ShufflePlanner(len(source), 3, strategy="partial", fraction=0.2, partition="label-sorted",
                             labels=source.targets, seed=3)  # fmt: skip
    for rank, (shards, _reads, held, message) in enumerate(results):
        assert shards == [s for s in range(5) if s % 3 == rank], (rank, shards)
        assert held == planner.plan(0).holdings(rank).tolist()
        assert "once and forwarded" in message
    assert sum(reads for _, reads, _, _ in results) == 600  # every sample read exactly once
    assert verify_store(tmp_path / "store") == []
    for rank in range(3):
        store = RankStore.open(tmp_path / "store", rank)
        for sample_id in store.ids[:20].tolist():
            assert store.read(sample_id) == source.raw(sample_id)
    again = run_ranks(_stage_counting_reads, 3, str(root), str(tmp_path / "store"), timeout=240)
    assert all(reads == 0 for _, reads, _, _ in again)
