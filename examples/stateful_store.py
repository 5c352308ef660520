"""Plain DDP with torchdata's StatefulDataLoader over reshuffle's store mode, checkpointing every
few steps, so a job stopped mid-epoch (preempted, or --stop-after) resumes at the next batch it
did not train. The loader's state holds the sampler's position; each rank's is saved.

    pip install torchdata
    torchrun --nproc-per-node 2 examples/stateful_store.py --store /tmp/fm/store --stop-after 30
    torchrun --nproc-per-node 2 examples/stateful_store.py --store /tmp/fm/store   # resumes at step 31
"""

import argparse
import gzip
import os

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from reshuffle import ShuffledData

parser = argparse.ArgumentParser()
parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
parser.add_argument("--store", required=True, help="node-local directory for the rank stores")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--limit", type=int, default=60000, help="train on the first N images")
parser.add_argument("--every", type=int, default=5, help="checkpoint every N steps (and at each epoch's end)")
parser.add_argument("--stop-after", type=int, help="stop after this many steps of this run (a preemption)")
parser.add_argument("--ids-out", help="write the ids each rank trained on here")
args = parser.parse_args()


def idx(name, offset, *shape):  # the first --limit items of a Fashion-MNIST IDX file
    with gzip.open(f"{args.data}/{name}-ubyte.gz") as f:
        items = np.frombuffer(f.read(), np.uint8, offset=offset).reshape(-1, *shape)
    return torch.from_numpy(items[: args.limit].copy())


images, labels = idx("train-images-idx3", 16, 1, 28, 28), idx("train-labels-idx1", 8).long()
dataset = TensorDataset(images, labels, torch.arange(len(labels)))  # items: (image, label, id)

dist.init_process_group("gloo")
data = ShuffledData(dataset, args.store, strategy="partial", fraction=0.1, partition="label-sorted",
                    labels=labels, seed=0, epochs=args.epochs)  # fmt: skip
loader = StatefulDataLoader(data.dataset, batch_size=64, sampler=data.sampler, num_workers=2)
torch.manual_seed(0)
model = nn.parallel.DistributedDataParallel(nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
    nn.Linear(16 * 14 * 14, 10),
))  # fmt: skip
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
checkpoint, start, trained = os.path.join(os.path.dirname(os.path.abspath(args.store)), "ckpt.pt"), 0, {}


def save(epoch):  # every rank's loader state, one file written by rank 0, atomically
    loaders = [None] * dist.get_world_size()
    dist.all_gather_object(loaders, loader.state_dict())
    if dist.get_rank() == 0:
        state = {"epoch": epoch, "model": model.module.state_dict(), "optimizer": optimizer.state_dict(),
                 "loaders": loaders}  # fmt: skip
        torch.save(state, checkpoint + ".tmp"), os.replace(checkpoint + ".tmp", checkpoint)


if os.path.exists(checkpoint):  # resume: model, optimizer, and where this rank's loader stood
    saved = torch.load(checkpoint, weights_only=True)
    model.module.load_state_dict(saved["model"]), optimizer.load_state_dict(saved["optimizer"])
    loader.load_state_dict(saved["loaders"][dist.get_rank()])  # applied at the next iter(loader)
    start = saved["epoch"]  # a finished epoch's state yields nothing more of it
steps = 0
for epoch in range(start, args.epochs):
    data.set_epoch(epoch)  # commits the exchange that ran during the last epoch, starts the next
    trained[epoch] = []
    for x, y, ids in loader:
        loss = nn.functional.cross_entropy(model(x.float().div(255).sub(0.286).div(0.353)), y)
        optimizer.zero_grad(), loss.backward(), optimizer.step()
        trained[epoch] += ids.tolist()
        steps += 1
        if steps % args.every == 0 or steps == args.stop_after:
            save(epoch)
        if steps == args.stop_after:
            break
    if steps == args.stop_after:
        break
    save(epoch)  # at the epoch's end too: a store only moves forward, so its checkpoint must
    if dist.get_rank() == 0:
        print(f"epoch {epoch}: last loss {loss.item():.3f}")
data.close()
if args.ids_out:
    torch.save(trained, f"{args.ids_out}.rank{dist.get_rank()}")
dist.destroy_process_group()
