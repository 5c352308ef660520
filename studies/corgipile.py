"""CorgiPile vs global shuffling on shards whose contents are homogeneous or mixed (issue 22).

Writes 20,000 Fashion-MNIST training images (the first 20,000, every class) as WebDataset tar
shards of 500 samples twice: in the dataset's own order (shards of mixed classes) and sorted by
label (each shard holds one class, as shards written class by class do). Then, for each, one rank
trains the small BatchNorm CNN for 4 epochs from the shards under:

* ``global``: a uniformly random order every epoch (random reads inside the shards);
* ``corgipile``: blocks of 500 consecutive ids (one shard each) shuffled, then the samples of
  each buffer of 8 blocks shuffled together (CorgiPile);
* ``corgipile`` with a buffer of 1 block: the blocks shuffled, samples only within their block;

3 seeds each (``reshuffle compare``), and prints each comparison's summary table.
Run: ``.venv/bin/python studies/corgipile.py [--seeds 3] [--out runs/corgipile]``.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def write_split(
    folder: Path, ids: np.ndarray, images: np.ndarray, labels: np.ndarray, per_shard: int
) -> None:
    """``images[ids]`` in that order as tar shards of ``per_shard``: <key>.png + <key>.cls."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for first in range(0, len(ids), per_shard):
        with tarfile.open(folder / f"shard-{first // per_shard:05d}.tar", "w") as archive:
            for key, i in enumerate(ids[first : first + per_shard].tolist(), start=first):
                png = io.BytesIO()
                Image.fromarray(images[i], "L").save(png, format="PNG")
                for name, payload in (
                    (f"{key:06d}.png", png.getvalue()),
                    (f"{key:06d}.cls", b"%d" % labels[i]),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    archive.addfile(info, io.BytesIO(payload))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--out", default="runs/corgipile")
    args = parser.parse_args()
    from reshuffle.data.fashion_mnist import load_fashion_mnist

    out = (ROOT / args.out).resolve()
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    images = train.images[: args.samples].reshape(-1, 28, 28)
    labels = train.targets[: args.samples]
    test_images, test_labels = test.images.reshape(-1, 28, 28), test.targets
    for name, order in (("mixed", np.arange(len(labels))), ("sorted", np.argsort(labels, kind="stable"))):
        data = out / "data" / name
        if not (data / "train").is_dir():
            write_split(data / "train", order, images, labels, 500)
            write_split(data / "test", np.arange(len(test_labels)), test_images, test_labels, 2000)
        system = out / f"system-{name}.yaml"
        system.write_text(
            f"datasets:\n  fm-{name}:\n    loader: webdataset\n    path: {data}\n"
            "    options: {image_size: 28, channels: 1}\n    mean: [0.2860]\n    std: [0.3530]\n"
        )
        subprocess.run(
            [sys.executable, "-m", "reshuffle", "compare", str(ROOT / "configs" / "fashion-mnist.yaml"),
             "--system", str(system), f"data.name=fm-{name}", f"name={name}", f"log.dir={out}",
             "train.epochs=4", "train.batch_size=64", "train.reference_batch=64", "log.tensorboard=false",
             "log.every_steps=0", "train.checkpoint_every=0", "shuffle.partition=contiguous",
             "shuffle.block_size=500", "--nproc", "1", "--seeds", str(args.seeds),
             "--strategies", "global", "corgipile", "corgipile+shuffle.buffer_blocks=1"],
            check=True,
        )  # fmt: skip


if __name__ == "__main__":
    main()
