"""A user's own loop around ShuffledData: a state taken anywhere inside it resumes exactly, or is
refused by name, whatever the DataLoader does ahead of the loop (workers, prefetch, persistent
workers, no batching)."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from reshuffle import ShuffledData
from spawn import run_ranks

NUM = 203


class Numbers(Dataset):
    """Item i: (i, label)."""

    def __init__(self, num: int = NUM) -> None:
        self.targets = [i % 5 for i in range(num)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return torch.tensor(index), self.targets[index]


def _ids(batch) -> list[int]:
    ids = batch[0]
    return [int(ids)] if ids.ndim == 0 else ids.tolist()


LOADERS = [
    {"batch_size": 16, "num_workers": 0},
    {"batch_size": 16, "num_workers": 2},
    {"batch_size": 16, "num_workers": 2, "prefetch_factor": 4},
    {"batch_size": 7, "num_workers": 2, "persistent_workers": True},
    {"batch_size": None, "num_workers": 2},
]


def _data(root=None, **kwargs) -> ShuffledData:
    options = {"strategy": "partial", "fraction": 0.25, "partition": "label-sorted", "seed": 3}
    return ShuffledData(Numbers(), root, **options, **kwargs)


def _stop_and_resume(make, options, stop_after, epoch=1) -> tuple[list[int], list[int], list[int]]:
    """Train ``stop_after`` batches of ``epoch``, take the state, resume in a fresh object and
    train the rest: (ids before, ids after, the epoch's whole order)."""
    data = make()
    loader = data.loader(**options)
    data.set_epoch(epoch)
    before = []
    for batch in itertools.islice(loader, stop_after):
        before += _ids(batch)
    state = data.state_dict()
    data.close()
    resumed = make()
    resumed.load_state_dict(state)
    loader = resumed.loader(**options)
    resumed.set_epoch(epoch)
    after = [i for batch in loader for i in _ids(batch)]
    order = resumed.sampler.indices().tolist()
    resumed.close()
    return before, after, order


@pytest.mark.parametrize("options", LOADERS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("stop_after", [1, 3, 6])
def test_a_state_inside_the_loop_resumes_at_the_first_batch_not_received(options, stop_after):
    """Index mode, one process: the ids trained before the state and after the resume are the
    epoch's order, each exactly once, whatever the loader fetched ahead (before this, a state
    taken with workers skipped the prefetched batches)."""
    before, after, order = _stop_and_resume(lambda: _data(rank=1, world_size=2), options, stop_after)
    assert before + after == order
    assert len(before) == min(len(order), stop_after * (options["batch_size"] or 1))


@pytest.mark.parametrize("restart", ["set_epoch(saved)", "set_epoch(saved + 1)"])
def test_a_state_after_the_last_batch_neither_repeats_nor_skips_an_epoch(restart):
    """A state taken after the epoch's last batch stays in that epoch, finished: a loop restarted
    at the saved epoch trains nothing more of it, then the next epoch whole; one restarted at
    the next epoch trains it whole (before, the load moved on by itself, and the natural loop
    trained epoch 2's order in epoch 1's slot and then again)."""
    data = _data(rank=0, world_size=2)
    loader = data.loader(batch_size=16, num_workers=2)
    expected = []
    for epoch in range(3):
        data.set_epoch(epoch)
        expected.append([i for batch in loader for i in _ids(batch)])
    state_at_1 = _state_after_epoch(1)
    resumed = _data(rank=0, world_size=2)
    resumed.load_state_dict(state_at_1)
    loader = resumed.loader(batch_size=16, num_workers=2)
    first = 1 if restart == "set_epoch(saved)" else 2
    trained = {}
    for epoch in range(first, 3):
        resumed.set_epoch(epoch)
        trained[epoch] = [i for batch in loader for i in _ids(batch)]
    assert trained.pop(1, []) == [] and trained == {2: expected[2]}


def _state_after_epoch(epoch: int):
    data = _data(rank=0, world_size=2)
    loader = data.loader(batch_size=16, num_workers=2)
    for current in range(epoch + 1):
        data.set_epoch(current)
        for _ in loader:
            pass
    return data.state_dict()


def _stateful_run(epochs, workers, snapshot, stop=None, state=None, restart_order="load, set_epoch"):
    """A StatefulDataLoader loop over ShuffledData's dataset and sampler; ``stop=(epoch, batch)``
    takes the loader's state right after that batch (an end-of-epoch state when it is the last)
    and stops. Returns the ids per epoch and the state."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    data = _data(rank=1, world_size=2)
    options = {"snapshot_every_n_steps": snapshot} if workers else {}
    loader = StatefulDataLoader(
        data.dataset, batch_size=16, sampler=data.sampler, num_workers=workers, **options
    )
    first, trained = 0, {}
    if state is not None:
        first = state["epoch"]
        if restart_order == "load, set_epoch":
            loader.load_state_dict(state["loader"])
    for epoch in range(first, epochs):
        data.set_epoch(epoch)
        if state is not None and epoch == first and restart_order == "set_epoch, load":
            loader.load_state_dict(state["loader"])
        trained[epoch] = []
        for index, batch in enumerate(loader):
            trained[epoch] += _ids(batch)
            if stop == (epoch, index):
                return trained, {"epoch": epoch, "loader": loader.state_dict()}
        if stop == (epoch, "after the loop"):
            return trained, {"epoch": epoch, "loader": loader.state_dict()}
    return trained, None


@pytest.mark.parametrize("snapshot", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("restart_order", ["load, set_epoch", "set_epoch, load"])
@pytest.mark.parametrize("where", ["mid-epoch", "last batch", "after the loop"])
def test_stateful_dataloader_states_neither_repeat_nor_skip_an_epoch(snapshot, workers, restart_order, where):
    """torchdata's StatefulDataLoader around ShuffledData's dataset and sampler: a step state taken
    mid-epoch, right after an epoch's last batch or after its loop, resumed by the natural loop from the saved
    epoch (the loader's state loaded before or after set_epoch), trains exactly what an
    uninterrupted run trains, with no warning (snapshot intervals 1, 2 and 3)."""
    import warnings

    reference, _ = _stateful_run(3, workers, snapshot)
    batches = -(-len(reference[1]) // 16)
    stop = (1, {"mid-epoch": 3, "last batch": batches - 1}.get(where, where))
    before, state = _stateful_run(3, workers, snapshot, stop=stop)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*ShuffleSampler.*")
        after, _ = _stateful_run(3, workers, snapshot, state=state, restart_order=restart_order)
    assert before[1] + after.pop(1) == reference[1]
    assert {0: before[0], **after} == {0: reference[0], 2: reference[2]}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_state_a_plain_dataloader_cannot_make_exact_is_refused_with_the_fixes(workers):
    """A plain DataLoader over data.sampler: mid-epoch, and even after its last batch (a loader
    with workers takes the last ids while the loop is batches short of them), the state names
    the fixes instead of guessing; before the first batch, after end_epoch(), or with position=
    it is taken."""
    data = _data(rank=0, world_size=2)
    loader = DataLoader(data.dataset, batch_size=16, sampler=data.sampler, num_workers=workers)
    data.set_epoch(0)
    assert data.state_dict()["sampler"]["position"] == 0  # nothing fetched yet
    iterator = iter(loader)
    first = _ids(next(iterator))
    with pytest.raises(ValueError, match=r"data\.loader\(.*data\.end_epoch\(\).*position="):
        data.state_dict()
    assert data.state_dict(position=16)["sampler"]["position"] == 16
    rest = [i for batch in iterator for i in _ids(batch)]
    with pytest.raises(ValueError, match="cannot tell what your loop trained"):
        data.state_dict()
    data.end_epoch()
    assert first + rest == data.sampler.indices().tolist()
    assert data.state_dict()["sampler"]["position"] == len(first + rest)


def _store_stop_and_resume(rank, world, root, options, stop_after):
    def make():
        return _data(root, epochs=3)

    return _stop_and_resume(make, options, stop_after, epoch=0)


@pytest.mark.slow
@pytest.mark.parametrize("options", [LOADERS[1], LOADERS[4]], ids=["batched", "unbatched"])
def test_store_mode_resumes_exactly_mid_epoch_with_prefetching_workers(tmp_path, options):
    """2 gloo ranks in store mode, DataLoader workers: a mid-epoch state resumes at the first batch
    the loop did not receive, on every rank."""
    results = run_ranks(_store_stop_and_resume, 2, str(tmp_path / "store"), options, 3, timeout=180)
    for before, after, order in results:
        assert before + after == order
        assert len(before) == 3 * (options["batch_size"] or 1)


def _store_end_of_epoch_restart(rank, world, root, first):
    data = _data(root, epochs=4)
    loader = data.loader(batch_size=16, num_workers=2)
    for epoch in range(2):
        data.set_epoch(epoch)
        for _ in loader:
            pass
    state = data.state_dict()
    data.close()
    resumed = _data(root, epochs=4)
    resumed.load_state_dict(state)
    loader = resumed.loader(batch_size=16, num_workers=2)
    trained, expected = {}, {}
    for epoch in range(first, 4):
        resumed.set_epoch(epoch)
        trained[epoch] = [i for batch in loader for i in _ids(batch)]
        expected[epoch] = resumed.planner.plan(epoch).indices(rank).tolist() if epoch > 1 else []
    resumed.close()
    return trained, expected


@pytest.mark.slow
@pytest.mark.parametrize("first", [1, 2], ids=["set_epoch(saved)", "set_epoch(saved + 1)"])
def test_store_mode_state_at_an_epochs_end_neither_repeats_nor_skips_an_epoch(tmp_path, first):
    """2 gloo ranks in store mode: a state taken after epoch 1's last batch, resumed from the saved
    epoch or the next, trains nothing more of epoch 1 and then epochs 2 and 3 as planned (the
    stores commit the exchange in between)."""
    for trained, expected in run_ranks(_store_end_of_epoch_restart, 2, str(tmp_path / "store"), first,
                                       timeout=180):  # fmt: skip
        assert trained == expected


@pytest.mark.parametrize("drop_last", [False, True])
def test_an_elastic_mid_epoch_resume_trains_the_rest_once_padding_as_distributed_sampler(drop_last):
    """2 ranks stop after 15 samples each of epoch 1; 3 ranks resume it. The samples not yet
    trained are trained once; where they do not divide by 3, every rank still gets the same count:
    (-rest) % 3 of them repeat, each on the rank that already had it (drop_last: rest % 3 are
    dropped), as DistributedSampler pads or drops. docs/sampler.md says exactly this."""
    old = [_data(rank=r, world_size=2, drop_last=drop_last) for r in range(2)]
    trained = []
    for data in old:
        loader = data.loader(batch_size=5)
        data.set_epoch(1)
        for batch in itertools.islice(loader, 3):
            trained += _ids(batch)
    state = old[0].state_dict()
    rest_expected = sorted(set(range(NUM)) - set(trained)) if not drop_last else None
    shares = []
    for rank in range(3):
        data = _data(rank=rank, world_size=3, drop_last=drop_last)
        data.load_state_dict(state)
        data.set_epoch(1)
        shares.append([i for batch in data.loader(batch_size=5) for i in _ids(batch)])
    assert len({len(share) for share in shares}) == 1
    everything = [i for share in shares for i in share]
    assert not set(everything) & set(trained)
    if drop_last:
        untrained = 2 * old[0].sampler.epoch_size - len(trained)
        assert len(everything) == untrained - untrained % 3
    else:
        assert sorted(set(everything)) == rest_expected
        repeats = len(everything) - len(set(everything))
        assert repeats == (-len(rest_expected)) % 3
        for share in shares:
            assert len(share) - len(set(share)) == sum(
                everything.count(i) - 1 for i in set(share) if share.count(i) > 1
            )


@pytest.mark.parametrize("workers", [{"num_workers": 2, "persistent_workers": True}, {"num_workers": 0}])
def test_augmentation_resumed_from_an_end_of_epoch_state_is_the_uninterrupted_runs(workers):
    """Random crops and flips through persistent DataLoader workers: resumed from a state taken
    after epoch 1's last batch, epoch 2 trains the very tensors an uninterrupted run trains. The
    draws are keyed by (seed, epoch, sample id), not taken from a worker's random stream, which a
    DataLoader reseeds for every pass (so worker-drawn augmentation differs after any resume)."""
    from reshuffle.data.synthetic import load_synthetic
    from reshuffle.data.transforms import build_transform

    def make():
        source = load_synthetic("train", num_samples=96, shape=(1, 8, 8))
        crops = build_transform(["random-crop:2", "horizontal-flip"], [0.5], [0.25])
        return ShuffledData(source, strategy="partial", fraction=0.25, rank=0, world_size=2, seed=3,
                            transform=crops)  # fmt: skip

    def epoch_tensors(data, loader, epoch):
        data.set_epoch(epoch)
        return torch.cat([batch[0] for batch in loader] or [torch.empty(0)])

    data = make()
    loader = data.loader(batch_size=8, **workers)
    uninterrupted = [epoch_tensors(data, loader, epoch) for epoch in range(3)]
    data = make()
    loader = data.loader(batch_size=8, **workers)
    for epoch in range(2):
        epoch_tensors(data, loader, epoch)
    state = data.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    loader = resumed.loader(batch_size=8, **workers)
    assert epoch_tensors(resumed, loader, 1).numel() == 0  # nothing of the finished epoch is left
    assert torch.equal(epoch_tensors(resumed, loader, 2), uninterrupted[2])
    assert not torch.equal(uninterrupted[1], uninterrupted[2])


USER_LOOP = """
import argparse, time
import torch, torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset
from reshuffle import ShuffledData

parser = argparse.ArgumentParser()
parser.add_argument("--store"); parser.add_argument("--ready"); parser.add_argument("--stop")
args = parser.parse_args()
dist.init_process_group("gloo")
dataset = TensorDataset(torch.randn(512, 8), torch.arange(512) % 4, torch.arange(512))
model = nn.parallel.DistributedDataParallel(nn.Linear(8, 4))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
with ShuffledData(dataset, args.store, strategy="partial", fraction=0.25, seed=0, epochs=50) as data:
    loader = data.loader(batch_size=16)
    for epoch in range(50):
        stopping = epoch == 1 and dist.get_rank() == 1
        if stopping and args.stop == "before set_epoch":
            open(args.ready, "w").close(); time.sleep(600)
        data.set_epoch(epoch)
        for step, (x, y, ids) in enumerate(loader):
            if stopping and step == 3 and args.stop == "inside a step":
                open(args.ready, "w").close(); time.sleep(600)
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(); loss.backward(); optimizer.step()
"""


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["inside a step", "before set_epoch"])
def test_a_users_loop_names_the_rank_that_was_lost(tmp_path, stop):
    """A plain DDP loop in `with ShuffledData(...) as data:`, two torchrun "nodes" of one rank.
    Node 1 (its agent and rank) is killed while rank 1 waits inside a training step, or before
    set_epoch; rank 0, blocked in DDP's all-reduce or in set_epoch's collective, fails with an
    error whose message names the lost rank (before: gloo's "Connection closed by peer")."""
    import subprocess
    import sys
    import time

    from reshuffle.train.distributed import free_port
    from spawn import kill_tree

    script, port, nodes = tmp_path / "loop.py", free_port(), []
    script.write_text(USER_LOOP)
    for node in (0, 1):
        output = open(tmp_path / f"node{node}.out", "w")  # noqa: SIM115 (closed with the process)
        nodes.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port), str(script),
             "--store", str(tmp_path / f"store{node}"), "--ready", str(tmp_path / "ready"), "--stop", stop],
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        ))  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (tmp_path / "ready").exists(), (tmp_path / "node1.out").read_text()[-3000:]
        time.sleep(1)  # rank 0 is waiting for rank 1 now
        kill_tree(nodes[1])
        nodes[0].wait(timeout=120)
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_tree(node)
    text = (tmp_path / "node0.out").read_text()
    assert nodes[0].returncode != 0
    assert "PeerError: rank 0 failed because rank 1 lost: its connection broke" in text, text[-4000:]
