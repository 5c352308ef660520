"""PyTorch Lightning on Fashion-MNIST with reshuffle's store mode: node-local stores that exchange
10% of each rank's samples per epoch. Lightning runs the loop, DDP and checkpoints; reshuffle is
the data path, held by a DataModule (its state rides in Lightning's checkpoint) and moved to each
epoch by a Callback. `use_distributed_sampler=False`: each rank already reads only its own share.

    pip install 'reshuffle[lightning]'
    python examples/lightning_store.py --store /tmp/fm/store --epochs 3   # Lightning starts 2 ranks
    python examples/lightning_store.py --store /tmp/fm/store --epochs 5   # resumes from last.ckpt
    python examples/lightning_store.py --store /tmp/b/store --every 5 --stop-after 15   # then again:
    python examples/lightning_store.py --store /tmp/b/store --every 5   # resumes mid-epoch, exactly
"""

import argparse
import gzip
import os

import lightning.pytorch as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from reshuffle import ShuffledData

parser = argparse.ArgumentParser()
parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
parser.add_argument("--store", required=True, help="node-local directory for the rank stores")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--limit", type=int, default=60000, help="train on the first N images")
parser.add_argument("--ids-out", help="write the ids each rank trained on here")
parser.add_argument("--every", type=int, help="also checkpoint every N steps (mid-epoch)")
parser.add_argument("--stop-after", type=int, help="stop after N steps in all (as a preemption would)")
args = parser.parse_args()


def idx(name, offset, *shape):  # the first --limit items of a Fashion-MNIST IDX file
    with gzip.open(f"{args.data}/{name}-ubyte.gz") as f:
        items = np.frombuffer(f.read(), np.uint8, offset=offset).reshape(-1, *shape)
    return torch.from_numpy(items[: args.limit].copy())


class FashionStore(L.LightningDataModule):
    def setup(self, stage):  # on every rank, after Lightning started the process group
        images, labels = idx("train-images-idx3", 16, 1, 28, 28), idx("train-labels-idx1", 8).long()
        dataset = TensorDataset(images, labels, torch.arange(len(labels)))  # items: (image, label, id)
        self.data = ShuffledData(dataset, args.store, strategy="partial", fraction=0.1, seed=0,
                                 partition="label-sorted", labels=labels, epochs=args.epochs)  # fmt: skip

    def train_dataloader(self):  # a DataLoader that counts what it delivered: exact mid-epoch states
        return self.data.loader(batch_size=64, num_workers=2)

    def state_dict(self):  # called on every rank when Lightning checkpoints; rank 0's is saved
        return self.data.state_dict()

    def load_state_dict(self, state):  # on resume, after setup and before the first epoch
        self.data.load_state_dict(state)

    def teardown(self, stage):
        self.data.close()


class SetEpoch(L.Callback):  # commits the exchange that ran during the last epoch, starts the next
    def on_train_epoch_start(self, trainer, module):  # before the epoch's first batch is fetched
        trainer.datamodule.data.set_epoch(trainer.current_epoch)

    def on_train_start(self, trainer, module):  # a restart mid-epoch skips that epoch's hook above
        trainer.datamodule.data.set_epoch(trainer.current_epoch)


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(16 * 14 * 14, 10),
        )  # fmt: skip
        self.trained = {}  # epoch -> the ids this rank trained on, in order

    def training_step(self, batch, batch_index):
        x, y, ids = batch
        self.trained.setdefault(self.current_epoch, []).extend(ids.tolist())
        return nn.functional.cross_entropy(self.net(x.float().div(255).sub(0.286).div(0.353)), y)

    def on_train_epoch_end(self):
        if self.trainer.is_global_zero:
            print(f"epoch {self.current_epoch}: done", flush=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


if __name__ == "__main__":
    folder = os.path.join(os.path.dirname(os.path.abspath(args.store)), "ckpt")
    # every epoch: a store only moves forward, so its checkpoint must too; with --every, also every
    # N steps, and last.ckpt is the newest of those (one saved when max_steps stops the run would
    # claim the epoch was over)
    callbacks = [SetEpoch(), L.callbacks.ModelCheckpoint(dirpath=folder, save_last=not args.every)]
    if args.every:  # mid-epoch too: the DataModule's state is exact at any step
        callbacks.append(
            L.callbacks.ModelCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=args.every)
        )
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=args.epochs,
                        max_steps=args.stop_after or -1, use_distributed_sampler=False, callbacks=callbacks,
                        logger=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    model = Classifier()
    resume = os.path.isdir(folder) and any(name.startswith("last") for name in os.listdir(folder))
    trainer.fit(model, datamodule=FashionStore(), ckpt_path="last" if resume else None)  # newest last*
    if args.ids_out:
        torch.save(model.trained, f"{args.ids_out}.rank{trainer.global_rank}")
