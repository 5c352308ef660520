"""Plain PyTorch DDP on Fashion-MNIST, with the data in node-local stores that exchange 10% of
each rank's samples per epoch (reshuffle's store mode). No reshuffle trainer: this is your loop.

    torchrun --nproc-per-node 2 examples/ddp_store.py --store /tmp/fm-store --epochs 3
    torchrun --nproc-per-node 2 examples/ddp_store.py --store /tmp/fm-store --epochs 5   # resumes
"""

import argparse
import gzip
import os

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from reshuffle import ShuffledData

parser = argparse.ArgumentParser()
parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
parser.add_argument("--store", required=True, help="node-local directory for the rank stores")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--limit", type=int, default=60000, help="train on the first N images")
parser.add_argument("--strategy", default="partial")
parser.add_argument("--fraction", type=float, default=0.1)
parser.add_argument("--partition", default="label-sorted")
parser.add_argument("--checkpoint", default=None, help="default: STORE/../checkpoint.pt")
parser.add_argument("--ids-out", default=None, help="write the ids each rank trained on here")
args = parser.parse_args()


class FashionMNIST(Dataset):
    """Items (uint8 image 1x28x28, label, index), read from the IDX files."""

    def __init__(self, root, limit):
        with gzip.open(f"{root}/train-images-idx3-ubyte.gz") as f:
            self.images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:limit]
        with gzip.open(f"{root}/train-labels-idx1-ubyte.gz") as f:
            self.targets = np.frombuffer(f.read(), np.uint8, offset=8)[:limit].astype(np.int64)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.from_numpy(self.images[i].copy()), int(self.targets[i]), i


dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
data = ShuffledData(
    FashionMNIST(args.data, args.limit),
    args.store,
    strategy=args.strategy,
    fraction=args.fraction,
    partition=args.partition,
    seed=0,
    epochs=args.epochs,
)
loader = DataLoader(data.dataset, batch_size=64, sampler=data.sampler, num_workers=2)
torch.manual_seed(0)
model = nn.parallel.DistributedDataParallel(
    nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 14 * 14, 10),
    )
)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
checkpoint = args.checkpoint or os.path.join(os.path.dirname(os.path.abspath(args.store)), "checkpoint.pt")
start = 0
if os.path.exists(checkpoint):  # resume: model, optimizer and the data path's state
    saved = torch.load(checkpoint, weights_only=True)
    model.module.load_state_dict(saved["model"]), optimizer.load_state_dict(saved["optimizer"])
    data.load_state_dict(saved["data"])
    start = saved["epoch"] + 1
trained = {}
for epoch in range(start, args.epochs):
    data.set_epoch(epoch)  # commits the exchange that ran during the last epoch, starts the next
    trained[epoch], correct = [], 0
    for images, labels, ids in loader:
        logits = model(images.float().div(255).sub(0.286).div(0.353))
        loss = nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad(), loss.backward(), optimizer.step()
        trained[epoch] += ids.tolist()
        correct += int((logits.argmax(1) == labels).sum())
    state = {
        "epoch": epoch,
        "model": model.module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "data": data.state_dict(),
    }  # every epoch: a store only moves forward
    if rank == 0:
        torch.save(state, checkpoint + ".tmp"), os.replace(checkpoint + ".tmp", checkpoint)
        print(
            f"epoch {epoch}: loss {loss.item():.3f}, train acc {correct / len(trained[epoch]):.3f} (rank 0)"
        )
data.close()
if args.ids_out:
    torch.save(trained, f"{args.ids_out}.rank{rank}")
dist.destroy_process_group()
