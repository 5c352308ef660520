"""``ShuffledData``, the public data path, driven the way a user's own DDP loop drives it."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from reshuffle import ShuffledData, ShufflePlanner
from reshuffle.data.items import ItemError, decode_item, encode_item
from reshuffle.store import verify_store
from spawn import launch, run_ranks

NUM = 203  # not a multiple of any world size used here


class Pictures(Dataset):
    """A user's dataset: a dict item with an image tensor, a numpy feature, a caption; labels."""

    def __init__(self, num: int = NUM) -> None:
        self.targets = [i % 7 for i in range(num)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = torch.full((3, 4, 4), index % 251, dtype=torch.uint8)
        return {"image": image, "feature": np.float32(index) / 3, "caption": f"#{index}"}, self.targets[index]


def test_items_round_trip_without_pickle():
    item = (
        torch.arange(12, dtype=torch.bfloat16).reshape(3, 4),
        {"a": np.arange(6, dtype=np.int16).reshape(2, 3).T, "b": "héllo", "c": [None, True, 2.5, b"\x00x"]},
        7,
        torch.tensor(5),
    )
    back = decode_item(encode_item(item))
    assert torch.equal(back[0], item[0]) and back[0].dtype == torch.bfloat16
    assert np.array_equal(back[1]["a"], item[1]["a"]) and back[1]["a"].dtype == np.int16
    assert back[1]["b"] == "héllo" and back[1]["c"] == [None, True, 2.5, b"\x00x"]
    assert back[2] == 7 and back[3].shape == () and int(back[3]) == 5
    with pytest.raises(ItemError, match=r"item\[1\]: a builtins.object cannot be stored"):
        encode_item((1, object()))
    with pytest.raises(ValueError, match="bad magic"):
        decode_item(b"nope")


def test_pil_images_round_trip():
    from PIL import Image

    image = Image.fromarray(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3), "RGB")
    back = decode_item(encode_item((image, 1)))[0]
    assert back.mode == "RGB" and back.size == image.size and back.tobytes() == image.tobytes()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="needs store_dir"):
        ShuffledData(Pictures(), mode="store")
    with pytest.raises(ValueError, match="mode must be one of"):
        ShuffledData(Pictures(), mode="disk")
    with pytest.raises(TypeError, match="not a map-style dataset"):
        ShuffledData(iter(range(3)), "somewhere")
    with pytest.raises(ValueError, match="rank must be in"):
        ShuffledData(Pictures(), rank=2, world_size=2)


def test_index_mode_is_the_sampler_in_one_process():
    data = ShuffledData(
        Pictures(), strategy="partial", fraction=0.2, partition="label-sorted", seed=5, rank=1, world_size=3
    )
    planner = ShufflePlanner(
        NUM, 3, strategy="partial", fraction=0.2, partition="label-sorted", labels=Pictures().targets, seed=5
    )
    for epoch in range(3):
        data.set_epoch(epoch)
        assert list(data.sampler) == planner.plan(epoch).indices(1).tolist()
    assert data.dataset[4][1] == 4  # the user's own items, untouched


def _train_like_a_user(rank, world, root, mode, epochs, strategy, checkpoint=None, crash_at=None):
    """A user's loop: DataLoader over data.dataset with data.sampler, set_epoch per epoch, rank 0
    saving the state at each epoch end and every rank resuming from it when it exists. Returns
    per epoch the ids trained on and whether each item is intact."""
    phases = None
    if crash_at is not None and rank == crash_at[0]:

        def phases(phase: str) -> None:  # SIGKILL this rank in the middle of an exchange
            if phase == crash_at[1] and data.epoch == crash_at[2]:
                os.kill(os.getpid(), signal.SIGKILL)

    options = {"fraction": 0.25} if strategy == "partial" else {}
    data = ShuffledData(
        Pictures(), root if mode == "store" else None, mode=mode, strategy=strategy, partition="label-sorted",
        seed=11, epochs=epochs, chunk_mb=0.001, on_exchange_phase=phases, **options,
    )  # fmt: skip
    start = 0
    if checkpoint is not None and os.path.exists(checkpoint):
        data.load_state_dict(torch.load(checkpoint, weights_only=True))
        start = data.epoch + 1
    loader = DataLoader(
        data.dataset, batch_size=8, sampler=data.sampler, num_workers=2, persistent_workers=True
    )
    seen = {}
    for epoch in range(start, epochs):
        data.set_epoch(epoch)
        ids, intact = [], True
        for item, labels in loader:
            batch_ids = (item["feature"] * 3).round().long().tolist()
            ids += batch_ids
            intact &= all(c == f"#{i}" for c, i in zip(item["caption"], batch_ids, strict=True))
            intact &= bool(
                torch.equal(
                    item["image"][:, 0, 0, 0], torch.tensor([i % 251 for i in batch_ids], dtype=torch.uint8)
                )
            )
            intact &= labels.tolist() == [i % 7 for i in batch_ids]
        seen[epoch] = (ids, intact)
        state = data.state_dict()
        if checkpoint is not None and rank == 0:
            torch.save(state, checkpoint + ".tmp")
            os.replace(checkpoint + ".tmp", checkpoint)
    data.close()
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["partial", "global"])
def test_store_mode_trains_the_plan_with_intact_items(tmp_path, strategy):
    epochs, world = 4, 2
    stored = run_ranks(
        _train_like_a_user, world, str(tmp_path / "store"), "store", epochs, strategy, timeout=240
    )
    indexed = run_ranks(_train_like_a_user, world, None, "index", epochs, strategy, timeout=240)
    options = {"fraction": 0.25} if strategy == "partial" else {}
    planner = ShufflePlanner(
        NUM, world, strategy=strategy, partition="label-sorted", labels=Pictures().targets, seed=11, **options
    )
    for rank in range(world):
        for epoch in range(epochs):
            ids, intact = stored[rank][epoch]
            assert intact, (rank, epoch)
            assert ids == planner.plan(epoch).indices(rank).tolist()
            assert indexed[rank][epoch] == (ids, True)
    assert verify_store(tmp_path / "store") == []


@pytest.mark.slow
def test_sigkill_during_an_exchange_then_restart_loses_nothing(tmp_path):
    """One rank is killed in the middle of the payload rounds into epoch 2; the job restarts every
    rank from the state rank 0 saved last and finishes: every sample is still held
    exactly once, intact, and the ids trained after the restart are the plan's."""
    root, epochs, world = str(tmp_path / "store"), 4, 2
    checkpoint = str(tmp_path / "data-state.pt")
    outcomes = launch(
        _train_like_a_user, world, root, "store", epochs, "partial", checkpoint, (1, "payload", 1),
        timeout=240, pg_timeout_s=20,
    )  # fmt: skip
    assert outcomes[1].exitcode == -signal.SIGKILL
    assert not outcomes[0].ok  # its peer died: the survivor fails by name, not by hanging
    # rank 0 saved the end of epoch 0, or of epoch 1 if it finished that epoch before the kill
    resumed = torch.load(checkpoint, weights_only=True)["sampler"]["epoch"] + 1
    assert resumed in (1, 2)
    finished = run_ranks(_train_like_a_user, world, root, "store", epochs, "partial", checkpoint, timeout=240)
    planner = ShufflePlanner(
        NUM,
        world,
        strategy="partial",
        fraction=0.25,
        partition="label-sorted",
        labels=Pictures().targets,
        seed=11,
    )
    for rank in range(world):
        assert sorted(finished[rank]) == list(range(resumed, epochs))
        for epoch in range(resumed, epochs):
            ids, intact = finished[rank][epoch]
            assert intact and ids == planner.plan(epoch).indices(rank).tolist()
    assert verify_store(root) == []
    assert sorted(Path(root).glob("rank-*/prepared.json")) == []


def test_a_users_own_set_epoch_is_left_to_the_user():
    """Only reshuffle's own datasets get set_epoch(epoch, seed=...); a user's dataset with a
    set_epoch of another signature is not called."""

    class WithEpoch(Pictures):
        calls = 0

        def set_epoch(self, epoch):
            WithEpoch.calls += 1

    data = ShuffledData(WithEpoch(), rank=0, world_size=2)
    data.set_epoch(0)
    data.set_epoch(1)
    assert WithEpoch.calls == 0 and len(list(data.sampler)) == data.planner.samples_per_rank


def test_recorded_losses_are_per_epoch():
    """end_epoch hands the strategy the losses of that epoch only: nothing carries over."""
    data = ShuffledData(Pictures(), track_losses=True, rank=0, world_size=1)
    for epoch, loss in ((0, 1.0), (1, 3.0)):
        data.set_epoch(epoch)
        ids = torch.tensor(list(data.sampler))
        data.record_losses(ids, torch.full((ids.numel(),), loss))
        data.end_epoch()
        seen, mean = data.losses()
        assert seen.numel() == NUM and torch.allclose(mean, torch.full((NUM,), loss)), (epoch, mean[:3])
