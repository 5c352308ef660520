from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from reshuffle import ShufflePlanner, ShuffleSampler
from spawn import run_ranks


class LabelledDataset(TensorDataset):
    def __init__(self, num: int, num_classes: int = 5) -> None:
        super().__init__(torch.arange(num))
        self.targets = [i % num_classes for i in range(num)]


def test_replaces_distributed_sampler_in_a_dataloader():
    dataset = LabelledDataset(103)
    samplers = [
        ShuffleSampler(dataset, 4, rank, strategy="partial", fraction=0.2, seed=1) for rank in range(4)
    ]
    reference = DistributedSampler(dataset, 4, 0)
    assert len(samplers[0]) == len(reference) == 26
    seen = []
    for rank, sampler in enumerate(samplers):
        sampler.set_epoch(3)
        loader = DataLoader(dataset, batch_size=8, sampler=sampler, num_workers=0)
        ids = torch.cat([batch[0] for batch in loader]).numpy()
        assert np.array_equal(ids, sampler.planner.plan(3).indices(rank))
        seen.append(ids)
    assert np.array_equal(np.unique(np.concatenate(seen)), np.arange(103))


def test_set_epoch_changes_the_order_and_is_reproducible():
    sampler = ShuffleSampler(LabelledDataset(50), 2, 1, strategy="global", seed=3)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first != second


def test_defaults_to_one_rank_when_torch_distributed_is_not_initialised():
    sampler = ShuffleSampler(LabelledDataset(20))
    assert (sampler.rank, sampler.num_replicas) == (0, 1)
    assert sorted(sampler) == list(range(20))


def test_labels_default_to_dataset_targets_for_label_partitions():
    dataset = LabelledDataset(100, num_classes=4)
    sampler = ShuffleSampler(dataset, 4, 2, strategy="local", partition="label-sorted")
    assert {dataset.targets[i] for i in sampler} == {2}
    with pytest.raises(ValueError, match="partition 'stratified' needs labels"):
        ShuffleSampler(TensorDataset(torch.arange(10)), 2, 0, partition="stratified")


def test_rank_outside_world_is_an_error():
    with pytest.raises(ValueError, match=r"rank must be in \[0, num_replicas=2\)"):
        ShuffleSampler(LabelledDataset(10), 2, 2)


@pytest.mark.parametrize("stop_after", [0, 1, 7, 25])
def test_resume_mid_epoch_yields_exactly_the_remaining_order(stop_after):
    dataset = LabelledDataset(103)
    kwargs = dict(strategy="partial", fraction=0.3, partition="stratified", seed=5)
    sampler = ShuffleSampler(dataset, 4, 1, **kwargs)
    sampler.set_epoch(2)
    iterator = iter(sampler)
    consumed = [next(iterator) for _ in range(stop_after)]
    state = sampler.state_dict()
    assert state[ShuffleSampler.STATE_POSITION] == stop_after

    other_rank = ShuffleSampler(dataset, 4, 3, **kwargs)  # DDP saves on rank 0, every rank loads
    other_rank.load_state_dict(state)
    assert list(other_rank) == list(sampler.planner.plan(2).indices(3)[stop_after:])

    restored = ShuffleSampler(dataset, 4, 1, **kwargs)
    restored.load_state_dict(state)
    restored.set_epoch(2)  # the usual loop calls set_epoch again; the position must survive
    # len is the epoch's share, as DistributedSampler's; remaining, what the resumed pass yields
    assert restored.remaining == 26 - stop_after and len(restored) == 26
    assert consumed + list(restored) == list(sampler.planner.plan(2).indices(1))


def test_a_state_saved_at_the_end_of_an_epoch_stays_finished_until_the_next_set_epoch():
    """The saved epoch was finished: loaded, it stays that epoch and yields nothing more (as
    torchdata's StatefulDistributedSampler), so both natural resumes, set_epoch(saved) or
    set_epoch(saved + 1), neither repeat nor skip an epoch; an epoch set before the load
    (StatefulDataLoader loads lazily, at iter()) is not overridden by it when it is later."""
    dataset = LabelledDataset(103)
    sampler = ShuffleSampler(dataset, 4, 1, strategy="partial", fraction=0.3, seed=5)
    sampler.set_epoch(2)
    list(sampler)
    state = sampler.state_dict()
    loaded = ShuffleSampler(dataset, 4, 1, strategy="partial", fraction=0.3, seed=5)
    loaded.load_state_dict(state)
    assert loaded.epoch == 2 and loaded.remaining == 0 and len(loaded) == 26 and list(loaded) == []
    loaded.set_epoch(3)
    assert list(loaded) == list(sampler.planner.plan(3).indices(1))
    again = ShuffleSampler(dataset, 4, 1, strategy="partial", fraction=0.3, seed=5)
    again.load_state_dict(state)
    again.set_epoch(2)  # the loop restarts at the saved epoch: nothing of it is left
    assert list(again) == []
    lazily = ShuffleSampler(dataset, 4, 1, strategy="partial", fraction=0.3, seed=5)
    lazily.set_epoch(5)
    lazily.load_state_dict(state)
    assert lazily.epoch == 5 and list(lazily) == list(sampler.planner.plan(5).indices(1))
    same = ShuffleSampler(dataset, 4, 1, strategy="partial", fraction=0.3, seed=5)
    same.set_epoch(2)
    same.load_state_dict(state)
    assert list(same) == []


def test_state_counts_what_was_yielded_and_resets_with_the_epoch():
    sampler = ShuffleSampler(LabelledDataset(40), 2, 0)
    sampler.set_epoch(0)
    assert sampler.state_dict()[ShuffleSampler.STATE_POSITION] == 0
    list(sampler)
    assert sampler.state_dict()[ShuffleSampler.STATE_POSITION] == 20
    sampler.set_epoch(1)
    assert sampler.state_dict()[ShuffleSampler.STATE_POSITION] == 0
    assert sampler.state_dict()[ShuffleSampler.STATE_EPOCH] == 1


def test_loading_a_state_from_another_configuration_is_an_error():
    state = ShuffleSampler(LabelledDataset(40), 2, 0, strategy="local").state_dict()
    other = ShuffleSampler(LabelledDataset(40), 2, 0, strategy="global")
    with pytest.raises(ValueError, match="strategy: saved 'local', this sampler has 'global'"):
        other.load_state_dict(state)
    bigger = ShuffleSampler(LabelledDataset(41), 2, 0, strategy="local")
    with pytest.raises(ValueError, match="num_samples: saved 40"):
        bigger.load_state_dict(state)
    corrupt = {**state, ShuffleSampler.STATE_POSITION: 99}
    with pytest.raises(ValueError, match="saved position 99 is outside"):
        ShuffleSampler(LabelledDataset(40), 2, 0, strategy="local").load_state_dict(corrupt)


def test_iterating_twice_without_set_epoch_warns_once():
    sampler = ShuffleSampler(LabelledDataset(10), 1, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(sampler)  # the first pass is fine
    with pytest.warns(UserWarning, match="without set_epoch"):
        list(sampler)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(sampler)  # warned once already
        sampler.set_epoch(1)
        list(sampler)


def _ranks_read_the_process_group(rank, world_size):
    sampler = ShuffleSampler(LabelledDataset(101), strategy="partial", fraction=0.5, seed=7)
    sampler.set_epoch(1)
    return sampler.rank, sampler.num_replicas, list(sampler)


@pytest.mark.slow
def test_rank_and_world_size_come_from_the_process_group():
    results = run_ranks(_ranks_read_the_process_group, 3, timeout=120)
    planner = ShufflePlanner(101, 3, strategy="partial", fraction=0.5, seed=7)
    for rank, (seen_rank, world, ids) in enumerate(results):
        assert (seen_rank, world) == (rank, 3)
        assert ids == planner.plan(1).indices(rank).tolist()
    assert len({len(ids) for _, _, ids in results}) == 1


def test_node_aware_sampler_deals_each_nodes_samples_afresh_every_epoch():
    """ranks_per_node=2 over 4 ranks: a node keeps its samples under local, its two ranks get a
    fresh deal of them each epoch, and every sample is still yielded once per epoch."""
    dataset = LabelledDataset(100)
    samplers = [ShuffleSampler(dataset, 4, r, strategy="local", seed=2, ranks_per_node=2) for r in range(4)]
    node_sets, rank_sets = [], []
    for epoch in (0, 1):
        ids = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            ids.append(set(iter(sampler)))
        assert sorted(i for s in ids for i in s) == list(range(100))
        node_sets.append([ids[0] | ids[1], ids[2] | ids[3]])
        rank_sets.append(ids)
    assert node_sets[0] == node_sets[1] and rank_sets[0] != rank_sets[1]
