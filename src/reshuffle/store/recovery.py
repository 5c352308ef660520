"""Recovery at job start: every rank's store brought to the epoch the job resumes at.

A commit happens only after every rank prepared (:meth:`Exchanger.agree`), so once any rank has
committed epoch E + 1, the others' prepared states of E + 1 are rolled forward; a prepared state
nobody committed is discarded unless every rank holds it and the job resumes past it. Then the
exchanges the job missed run until every store holds the target epoch's plan.
"""

from __future__ import annotations

import numpy as np

from reshuffle.store import format as fmt
from reshuffle.store.exchange import Exchanger
from reshuffle.store.verify import check_holdings


def synchronize(exchanger: Exchanger, target_epoch: int) -> list[str]:
    """Collective: agree on where every store is, finish an interrupted commit, then run exchanges
    until every store holds ``target_epoch``'s plan. Returns what was done, a line per action.

    Every rank first shares (target, committed epoch, prepared epoch), so all ranks take the same
    decision before any store changes."""
    store, rank = exchanger.store, exchanger.rank
    prepared = store.prepared_epoch()
    table = exchanger.gather_ints(
        [target_epoch, store.epoch, -1 if prepared is None else prepared], "recovery"
    )
    targets, committed, pending = table[:, 0], table[:, 1], table[:, 2]
    if np.unique(targets).size > 1:
        raise fmt.StoreError(
            "the ranks resume at different epochs ("
            + ", ".join(f"rank {r}: {int(t)}" for r, t in enumerate(targets))
            + "); every rank must load the same state (reshuffle run agrees on one checkpoint; in your "
            "own loop, load the same checkpoint on every rank, or send it from one rank to the others)"
        )
    newest, oldest = int(committed.max()), int(committed.min())
    roll_forward = (newest == oldest + 1 and np.all((committed == newest) | (pending == newest))) or (
        newest == oldest and newest < target_epoch and np.all(pending == newest + 1)
    )
    actions = []
    if roll_forward and prepared is not None and store.epoch < prepared:
        store.commit()
        actions.append(f"rank {rank}: rolled an interrupted commit forward to epoch {prepared}")
    elif store.prepared_epoch() is not None:
        store.discard_prepared()
        actions.append(f"rank {rank}: discarded an uncommitted exchange into epoch {prepared}")
    removed = store.release_dead_space()["removed_files"]
    if removed:
        actions.append(f"rank {rank}: removed {removed} file(s) left by an interrupted exchange")
    epochs = exchanger.gather_ints([store.epoch], "recovery")[:, 0]
    newest, oldest = int(epochs.max()), int(epochs.min())
    if newest != oldest:
        raise fmt.StoreError(
            f"the rank stores are at epochs {oldest}..{newest}; restage into an empty store_dir"
        )
    if oldest > target_epoch:
        raise fmt.StoreError(
            f"the stores are at epoch {oldest}, past the epoch {target_epoch} the job resumes at; they "
            "cannot go back: restage into an empty store_dir, or resume from a newer checkpoint"
        )
    for epoch in range(oldest, target_epoch):
        exchanger.exchange(epoch)
        actions.append(f"rank {rank}: exchanged epoch {epoch} -> {epoch + 1} to catch up")
    check_holdings(store, exchanger.planner)
    return actions
