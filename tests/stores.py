"""Store helpers the store and fault tests share: stores staged in one process, and exchanges
made by hand between them (no torch.distributed)."""

from __future__ import annotations

import numpy as np

from reshuffle import ShufflePlanner
from reshuffle.data.synthetic import load_synthetic
from reshuffle.store import stage

WORLD = 3


def staged(
    root, num=100, sample_bytes=1000, world=WORLD, strategy="partial", fraction=0.2, max_pack_bytes=None
):
    source = load_synthetic("train", num_samples=num, sample_bytes=sample_bytes)
    planner = ShufflePlanner(num, world, strategy=strategy, fraction=fraction, seed=1)
    kwargs = {} if max_pack_bytes is None else {"max_pack_bytes": max_pack_bytes}
    stores = [stage(root, rank, source, planner, **kwargs)[0] for rank in range(world)]
    return source, planner, stores


def prepare_moves(stores, moves, epoch, max_pack_bytes=1 << 28):
    """A hand-made exchange in one process: ``moves`` is ``{(src, dst): ids}``; every rank prepares
    ``epoch`` (phase 1) and nothing is committed."""
    for rank, store in enumerate(stores):
        writer = store.pack_writer(max_pack_bytes)
        for (src, dst), ids in moves.items():
            if dst == rank:
                for i in ids:
                    writer.append(int(i), stores[src].label(int(i)), stores[src].read(int(i)))
        sent = [ids for (src, _), ids in moves.items() if src == rank]
        removed = np.concatenate(sent) if sent else np.empty(0, dtype=np.int64)
        store.prepare(epoch, removed, writer.close(), compact_into=store.pack_writer(max_pack_bytes))


def run_partial_epochs(root, epochs, sample, pack, num=120):
    """Partial (Q = 0.1) exchanges between two in-process stores: the source, and an iterator
    that yields the stores after each commit."""
    source, planner, stores = staged(
        root, num=num, sample_bytes=sample, world=2, fraction=0.1, max_pack_bytes=pack
    )

    def commits():
        for epoch in range(1, epochs + 1):
            plan = planner.plan(epoch - 1)
            moves = {(src, dst): ids for src in (0, 1) for dst, ids in plan.sends(src).items()}
            prepare_moves(stores, moves, epoch, max_pack_bytes=pack)
            for store in stores:
                store.commit()
            yield stores

    return source, commits()
