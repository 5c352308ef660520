"""What a user's own DDP loop needs for a resume that is exact to the bit."""

from __future__ import annotations

import torch
from torch import nn


def settle_buckets(ddp: nn.Module, example: torch.Tensor) -> None:
    """One forward and backward through ``ddp`` that leaves no trace, so that its gradient
    buckets take their final layout before training (collective: every rank, once, right after
    wrapping the model; ``example`` is a small batch shaped like the training batches).

    DDP lays its buckets out again after its first backward, in the order gradients became
    ready. With three or more ranks an all-reduce's float sums depend on where a gradient lies
    in its bucket, so the first step after a resume (old layout) differed from the same step of
    an uninterrupted run (new layout) in the last bits, and the runs drifted apart. Buffers
    (BatchNorm statistics), the RNG streams and the gradients are restored afterwards.
    """
    buffers = [b.detach().clone() for b in ddp.buffers()]
    devices = [example.device] if example.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        ddp(example).float().sum().backward()
    with torch.no_grad():
        for buffer, saved in zip(ddp.buffers(), buffers, strict=True):
            buffer.copy_(saved)
    ddp.zero_grad(set_to_none=True)
