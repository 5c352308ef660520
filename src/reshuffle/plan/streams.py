"""Every random draw in the planner comes from one of these named streams.

A stream is ``np.random.default_rng((seed, stream, epoch, rank))``: the same four numbers give
the same draws in any process, and nothing depends on how often anything was called before.
"""

from __future__ import annotations

import enum

import numpy as np


class Stream(enum.IntEnum):
    """What a random draw is for; the value is part of the key, so never renumber."""

    PARTITION = 1  # the initial partition and the within-class order of label partitions
    GLOBAL = 2  # the fresh partition of each epoch under `global`
    ORDER = 3  # a rank's local training order in an epoch
    PARTIAL = 4  # which slots move, and where, between two epochs under `partial`
    IMPORTANCE = 5  # importance-weighted choices (partial with select='importance')
    DEAL = 6  # node-aware plans: how a node deals its samples among its ranks in an epoch


def entropy(seed: int) -> int:
    """``seed`` as numpy's entropy: any int64 (``DistributedSampler`` takes negative seeds) as an
    unsigned 64-bit number; non-negative seeds are unchanged, so their plans are too."""
    return int(seed) % (1 << 64)


def key(seed: int, stream: Stream, epoch: int = 0, rank: int = 0) -> tuple[int, int, int, int]:
    """The entropy tuple of a stream; always four numbers so keys never collide by length."""
    return (entropy(seed), int(stream), int(epoch), int(rank))


def rng(seed: int, stream: Stream, epoch: int = 0, rank: int = 0) -> np.random.Generator:
    """A fresh generator for one stream at one (epoch, rank)."""
    return np.random.default_rng(key(seed, stream, epoch, rank))
