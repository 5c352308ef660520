"""Plain PyTorch DDP on Fashion-MNIST, with the data in node-local stores that exchange 10% of
each rank's samples per epoch (reshuffle's store mode). No reshuffle trainer: this is your loop.

    torchrun --nproc-per-node 2 examples/ddp_store.py --store /tmp/fm/store --epochs 3
    torchrun --nproc-per-node 2 examples/ddp_store.py --store /tmp/fm/store --epochs 5   # resumes
"""

import argparse
import gzip
import os

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

from reshuffle import ShuffledData, settle_buckets

parser = argparse.ArgumentParser()
parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
parser.add_argument("--store", required=True, help="node-local directory for the rank stores")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--limit", type=int, default=60000, help="train on the first N images")
parser.add_argument("--ids-out", help="write the ids each rank trained on here")
args = parser.parse_args()


def idx(name, offset, *shape):  # the first --limit items of a Fashion-MNIST IDX file
    with gzip.open(f"{args.data}/{name}-ubyte.gz") as f:
        items = np.frombuffer(f.read(), np.uint8, offset=offset).reshape(-1, *shape)
    return torch.from_numpy(items[: args.limit].copy())


images, labels = idx("train-images-idx3", 16, 1, 28, 28), idx("train-labels-idx1", 8).long()
dataset = TensorDataset(images, labels, torch.arange(len(labels)))  # items: (image, label, id)

dist.init_process_group("gloo")
torch.manual_seed(0)
model = nn.parallel.DistributedDataParallel(nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
    nn.Linear(16 * 14 * 14, 10),
))  # fmt: skip
settle_buckets(model, torch.zeros(2, 1, 28, 28))  # exact resume with 3+ ranks (DDP's bucket layout)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
checkpoint, start, trained = os.path.join(os.path.dirname(os.path.abspath(args.store)), "ckpt.pt"), 0, {}
# stages this rank's share into its store (or reopens it); an error a lost rank caused names it
with ShuffledData(dataset, args.store, strategy="partial", fraction=0.1, partition="label-sorted",
                  labels=labels, seed=0, epochs=args.epochs) as data:  # fmt: skip
    loader = data.loader(batch_size=64, num_workers=2)  # a DataLoader that counts what the loop received
    if os.path.exists(checkpoint):  # resume: model, optimizer and the data path's state (store included)
        saved = torch.load(checkpoint, weights_only=True)
        model.module.load_state_dict(saved["model"]), optimizer.load_state_dict(saved["optimizer"])
        data.load_state_dict(saved["data"])
        start = saved["epoch"] + 1
    for epoch in range(start, args.epochs):
        data.set_epoch(epoch)  # commits the exchange that ran during the last epoch, starts the next
        trained[epoch] = []
        for x, y, ids in loader:
            loss = nn.functional.cross_entropy(model(x.float().div(255).sub(0.286).div(0.353)), y)
            optimizer.zero_grad(), loss.backward(), optimizer.step()
            trained[epoch] += ids.tolist()
        state = {"epoch": epoch, "model": model.module.state_dict(), "optimizer": optimizer.state_dict(),
                 "data": data.state_dict()}  # fmt: skip
        if dist.get_rank() == 0:  # every epoch: a store only moves forward, so its checkpoint must too
            torch.save(state, checkpoint + ".tmp"), os.replace(checkpoint + ".tmp", checkpoint)
            print(f"epoch {epoch}: last loss {loss.item():.3f}")
if args.ids_out:
    torch.save(trained, f"{args.ids_out}.rank{dist.get_rank()}")
dist.destroy_process_group()
