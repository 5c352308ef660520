"""Hugging Face Accelerate on Fashion-MNIST with reshuffle's store mode: node-local stores that
exchange 10% of each rank's samples per epoch. Accelerate handles the model, optimizer and
devices; reshuffle handles the data (so the loader is not passed to ``accelerator.prepare``,
which would re-shard what each rank already owns).

    pip install 'reshuffle[accelerate]'
    accelerate launch --num_processes 2 examples/accelerate_store.py --store /tmp/fm/store
    torchrun --nproc-per-node 2 examples/accelerate_store.py --store /tmp/fm/store --epochs 5
"""

import argparse
import gzip
import os

import numpy as np
import torch
from accelerate import Accelerator
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

# sets up torch.distributed, which ShuffledData uses; without a GPU, Accelerate needs cpu=True to
# treat torchrun's processes as one job (else each process trains alone)
accelerator = Accelerator(cpu=not torch.cuda.is_available())
data = ShuffledData(dataset, args.store, strategy="partial", fraction=0.1, partition="label-sorted",
                    labels=labels, seed=0, epochs=args.epochs)  # fmt: skip
loader = data.loader(batch_size=64, num_workers=2)  # a DataLoader that counts what the loop received
torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
    nn.Linear(16 * 14 * 14, 10),
)  # fmt: skip
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
checkpoint, start, trained = os.path.join(os.path.dirname(os.path.abspath(args.store)), "ckpt.pt"), 0, {}
if os.path.exists(checkpoint):  # resume: model, optimizer and the data path's state (store included)
    saved = torch.load(checkpoint, weights_only=True)
    model.load_state_dict(saved["model"]), optimizer.load_state_dict(saved["optimizer"])
    data.load_state_dict(saved["data"])
    start = saved["epoch"] + 1
model, optimizer = accelerator.prepare(model, optimizer)
settle_buckets(model, torch.zeros(2, 1, 28, 28, device=accelerator.device))  # exact resume, 3+ ranks
for epoch in range(start, args.epochs):
    data.set_epoch(epoch)  # commits the exchange that ran during the last epoch, starts the next
    trained[epoch] = []
    model.train()
    for x, y, ids in loader:
        x, y = x.to(accelerator.device), y.to(accelerator.device)
        loss = nn.functional.cross_entropy(model(x.float().div(255).sub(0.286).div(0.353)), y)
        optimizer.zero_grad(), accelerator.backward(loss), optimizer.step()
        trained[epoch] += ids.tolist()
    state = {"epoch": epoch, "model": accelerator.unwrap_model(model).state_dict(),
             "optimizer": optimizer.state_dict(), "data": data.state_dict()}  # fmt: skip
    if accelerator.is_main_process:  # every epoch: a store only moves forward, so must its checkpoint
        torch.save(state, checkpoint + ".tmp"), os.replace(checkpoint + ".tmp", checkpoint)
        print(f"epoch {epoch}: last loss {loss.item():.3f}")
    accelerator.wait_for_everyone()
data.close()
if args.ids_out:
    torch.save(trained, f"{args.ids_out}.rank{accelerator.process_index}")
accelerator.end_training()
