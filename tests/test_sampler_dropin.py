"""ShuffleSampler as a drop-in for DistributedSampler and inside torchdata's StatefulDataLoader:
properties adapted from PyTorch's DistributedSampler tests and torchdata's StatefulDataLoader
tests (issue 18). Every resume check compares exact ids against an uninterrupted run."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchdata import stateful_dataloader as torchdata  # a dev dependency

from reshuffle import PARTITIONS, STRATEGIES, ShuffleSampler


class Labelled(TensorDataset):
    def __init__(self, n: int) -> None:
        super().__init__(torch.arange(n))
        self.targets = torch.arange(n) % 5


def _ids(loader) -> list[int]:
    out: list[int] = []
    for batch in loader:
        item = batch[0] if isinstance(batch, (list, tuple)) else batch
        out += torch.as_tensor(item).reshape(-1).tolist()
    return out


@pytest.mark.parametrize("n", [0, 1, 3, 10, 11, 12, 101])
@pytest.mark.parametrize("m", [1, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_lengths_attributes_and_sequential_order_are_distributed_samplers(n, m, drop_last):
    """Positional arguments as DistributedSampler takes them; the same num_samples, total_size and
    len; with shuffle=False the very same order; N < M pads and N = 0 yields nothing."""
    data = list(range(n))
    for shuffle in (False, True):
        for rank in range(m):
            ours = ShuffleSampler(data, m, rank, shuffle, 7, drop_last)
            theirs = DistributedSampler(data, m, rank, shuffle, 7, drop_last)
            for name in (
                "num_samples",
                "total_size",
                "seed",
                "drop_last",
                "shuffle",
                "dataset",
                "num_replicas",
            ):
                assert getattr(ours, name) == getattr(theirs, name), name
            order = list(ours)
            assert len(ours) == len(theirs) == len(order)
            if not shuffle or n < m:
                assert order == list(theirs)


def test_world_size_is_accepted_for_num_replicas_and_keywords_match():
    a = ShuffleSampler(list(range(10)), world_size=2, rank=1, shuffle=False)
    b = DistributedSampler(list(range(10)), num_replicas=2, rank=1, shuffle=False)
    assert list(a) == list(b)
    with pytest.raises(ValueError, match="num_replicas=2 and world_size=3 differ"):
        ShuffleSampler(list(range(10)), num_replicas=2, world_size=3, rank=0)
    with pytest.raises(ValueError, match="shuffle=False yields the sequential order"):
        ShuffleSampler(list(range(10)), 2, 0, shuffle=False, strategy="local")


@pytest.mark.parametrize("strategy", sorted(set(STRATEGIES) - {"importance"}))
@pytest.mark.parametrize("partition", sorted(PARTITIONS))
def test_every_strategy_and_partition_covers_the_dataset_with_equal_lengths(strategy, partition):
    dataset, m = Labelled(103), 4
    options = {"fraction": 0.3} if strategy == "partial" else {}
    for epoch in (0, 3):
        orders = []
        for rank in range(m):
            sampler = ShuffleSampler(
                dataset, m, rank, strategy=strategy, partition=partition, seed=3, **options
            )
            sampler.set_epoch(epoch)
            orders.append(list(sampler))
        assert {len(o) for o in orders} == {26}
        assert sorted({i for order in orders for i in order}) == list(range(103))  # nothing missing


def _resumed_through_dataloader(
    position, workers, batch_size, drop_last, strategy="partial", partition="random"
):
    dataset = Labelled(50)
    options = {"fraction": 0.2} if strategy == "partial" else {}
    whole = ShuffleSampler(dataset, 2, 1, strategy=strategy, partition=partition, seed=1, **options)
    if strategy == "importance":
        whole.planner.observe(0, np.arange(50), np.linspace(0, 1, 50))
    whole.set_epoch(1)
    order = whole.indices().tolist()
    state = whole.state_dict()
    state[ShuffleSampler.STATE_POSITION] = position
    sampler = ShuffleSampler(dataset, 2, 1, strategy=strategy, partition=partition, seed=1, **options)
    sampler.load_state_dict(state)
    sampler.set_epoch(1)
    batched_drop = drop_last and batch_size is not None  # batch_size=None excludes drop_last
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=batched_drop
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "iterated again without set_epoch()" warning
        got = _ids(loader)
    rest = order[position:]
    if drop_last and batch_size:
        rest = rest[: len(rest) // batch_size * batch_size]
    return got, rest


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("batch_size", [None, 1, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_a_resumed_position_survives_any_dataloader(workers, batch_size, drop_last):
    """A plain DataLoader with workers calls iter(sampler) twice (one iterator is dropped): the
    resume position must survive it (with num_workers=2, batch_size=None it used to restart)."""
    got, expected = _resumed_through_dataloader(9, workers, batch_size, drop_last)
    assert got == expected


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("partition", sorted(PARTITIONS))
@pytest.mark.parametrize(("workers", "batch_size"), [(0, 4), (2, None)])
def test_every_strategy_and_partition_resumes_through_a_dataloader(strategy, partition, workers, batch_size):
    got, expected = _resumed_through_dataloader(7, workers, batch_size, False, strategy, partition)
    assert got == expected


def _stateful(dataset, workers, batch_size=4):
    sampler = ShuffleSampler(dataset, 2, 0, strategy="partial", fraction=0.25, seed=2)
    loader = torchdata.StatefulDataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers
    )
    return sampler, loader


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_batches", [3, None])  # mid-epoch, or at the end of the epoch
def test_stateful_dataloader_resumes_exactly_and_continues_two_epochs(workers, stop_batches):
    """torchdata's pattern: save loader.state_dict() mid-epoch or after an epoch, build a new
    loader, load_state_dict (applied lazily at iter()), set_epoch, and keep going for two more
    epochs: the ids are exactly an uninterrupted run's."""
    dataset = Labelled(64)
    sampler, loader = _stateful(dataset, workers)
    reference = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        reference.append(_ids(loader))

    sampler, loader = _stateful(dataset, workers)
    seen: list[list[int]] = [[], []]
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for index, batch in enumerate(loader):
            seen[epoch] += batch[0].tolist()
            if epoch == 1 and stop_batches is not None and index + 1 == stop_batches:
                break
        if epoch == 1:
            state = loader.state_dict()
    state = json.loads(json.dumps(state, default=lambda value: value.tolist()))  # plain data survives JSON
    sampler, loader = _stateful(dataset, workers)
    loader.load_state_dict(state)
    resume_epoch = 1 if stop_batches is not None else 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for epoch in range(resume_epoch, 4):
            sampler.set_epoch(epoch)
            ids = _ids(loader)
            if epoch == 1:
                seen[1] += ids
            else:
                seen.append(ids)
    assert seen == reference


def test_importance_state_is_plain_data():
    """A saved state loads with json and torch.load(weights_only=True) (numpy arrays did not)."""
    dataset = Labelled(40)
    sampler = ShuffleSampler(dataset, 2, 0, strategy="importance", warmup_epochs=1, interval_epochs=1)
    sampler.planner.observe(0, np.arange(40), np.linspace(0, 1, 40))
    sampler.set_epoch(1)
    state = sampler.state_dict()
    assert json.loads(json.dumps(state)) == state
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    other = ShuffleSampler(dataset, 2, 0, strategy="importance", warmup_epochs=1, interval_epochs=1)
    other.load_state_dict(loaded)
    other.set_epoch(1)
    sampler.set_epoch(1)
    assert list(other) == list(sampler)


def _sampler(dataset, world, rank, strategy, partition):
    options = {"fraction": 0.3} if strategy == "partial" else {}
    if strategy == "importance":
        options = {"warmup_epochs": 1, "interval_epochs": 1}
    return ShuffleSampler(dataset, world, rank, strategy=strategy, partition=partition, seed=4, **options)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("partition", ["random", "label-sorted"])
@pytest.mark.parametrize(("old", "new"), [(4, 2), (2, 3)])
def test_an_elastic_resume_mid_epoch_trains_every_sample_of_the_epoch_once(strategy, partition, old, new):
    """A state saved by `old` ranks mid-epoch continues with `new` ranks: the rest of the epoch is
    dealt over them in equal shares (every sample of the epoch once, counting what was trained
    before), through a DataLoader with workers; the state saved in that resized epoch resumes
    it again exactly; the next epoch is the new world size's plan."""
    dataset, epoch, steps = Labelled(103), 2, 9
    before = [_sampler(dataset, old, r, strategy, partition) for r in range(old)]
    if strategy == "importance":
        for sampler in before:
            sampler.planner.observe(0, np.arange(103), np.linspace(0, 1, 103))
            sampler.planner.observe(1, np.arange(103), np.linspace(1, 0, 103))
    trained = []
    for sampler in before:
        sampler.set_epoch(epoch)
        trained += sampler.indices()[:steps].tolist()
    state = before[0].state_dict()
    state[ShuffleSampler.STATE_POSITION] = steps
    state = json.loads(json.dumps(state))
    after = [_sampler(dataset, new, r, strategy, partition) for r in range(new)]
    rests = []
    for sampler in after:
        sampler.load_state_dict(state)
        sampler.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=2 if sampler.rank == 0 else 0)
        rests.append(_ids(loader))
    assert len({len(r) for r in rests}) == 1
    assert sorted(set(trained) | {i for r in rests for i in r}) == list(range(103))
    assert not set(trained) & {i for r in rests for i in r}
    # saved again inside the resized epoch, at the new size: the same rest, from there
    again = _sampler(dataset, new, 1, strategy, partition)
    again.load_state_dict(state)
    again.set_epoch(epoch)
    iterator = iter(again)
    head = [next(iterator) for _ in range(3)]
    resumed = _sampler(dataset, new, 1, strategy, partition)
    resumed.load_state_dict(json.loads(json.dumps(again.state_dict())))
    resumed.set_epoch(epoch)
    assert head + list(resumed) == rests[1]
    if strategy == "importance":  # the next partition follows epoch 2's losses
        resumed.planner.observe(epoch, np.arange(103), np.linspace(0, 2, 103))
    resumed.set_epoch(epoch + 1)
    assert list(resumed) == resumed.planner.plan(epoch + 1).indices(1).tolist()


def test_an_elastic_state_at_an_epoch_boundary_plans_the_next_epoch_for_the_new_size():
    dataset = Labelled(60)
    sampler = ShuffleSampler(dataset, 4, 0, strategy="local", partition="label-sorted", seed=1)
    sampler.set_epoch(3)
    list(sampler)
    resized = ShuffleSampler(dataset, 3, 2, strategy="local", partition="label-sorted", seed=1)
    resized.load_state_dict(sampler.state_dict())
    assert resized.epoch == 3 and list(resized) == []  # the saved epoch was finished
    resized.set_epoch(4)
    assert list(resized) == resized.planner.plan(4).indices(2).tolist()
    with pytest.raises(ValueError, match="differently configured sampler"):
        ShuffleSampler(dataset, 3, 0, strategy="global", seed=1).load_state_dict(sampler.state_dict())
