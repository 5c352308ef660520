"""``ShuffledData``, the public data path, driven the way a user's own DDP loop drives it."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from reshuffle import ShuffledData, ShufflePlanner
from reshuffle.data.items import ItemError, decode_item, encode_item
from reshuffle.store import RankStore, verify_store
from reshuffle.store.verify import damage
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


def test_an_item_with_a_large_bytes_value_keeps_it_as_the_records_body(monkeypatch):
    """The largest bytes value of BODY_FROM bytes or more goes last (``RSI2``), so a store read
    returns it without a copy; decoded whole or as (head, body) the item is equal, with every
    other value (None included) in place. Items written before ``RSI2`` still decode."""
    from reshuffle.data import items

    jpeg = bytes(range(256)) * 80  # 20 KiB
    item = {"image": jpeg, "thumb": b"small", "meta": (None, 3, [jpeg[:100], None])}
    record = encode_item(item)
    assert record[:4] == b"RSI2" and record.endswith(jpeg)
    cut = items.head_size(record[:512])
    assert cut == len(record) - len(jpeg)
    for back in (decode_item(record), decode_item(record[:cut], record[cut:])):
        assert back == item and type(back["image"]) is bytes
    assert encode_item((b"x" * 100, 1))[:4] == b"RSI1"  # small: one part, as before
    assert items.head_size(encode_item((b"x" * 100, 1))) is None
    monkeypatch.setattr(items, "BODY_FROM", 1 << 30)  # as a store written before RSI2
    old = encode_item(item)
    assert old[:4] == b"RSI1" and decode_item(old) == item
    with pytest.raises(ValueError, match="head is truncated"):
        decode_item(record[: cut - 1], record[cut:])
    with pytest.raises(ValueError, match="bad magic"):
        decode_item(old[:cut], record[cut:])


def test_a_bytes_and_int_pair_read_in_two_parts_decodes_as_decode_item_does():
    """The store's decoder answers an ImageNet-shaped item (an encoded image and its label) from
    the head's known layout; every near miss (a list, another order, a wider tuple, a str label, a
    damaged head) takes the general decoder, so the answers and errors are decode_item's."""
    from reshuffle.data import items

    jpeg = bytes(range(256)) * 80
    decoder = items.ItemDecoder()
    pairs = [(jpeg, 7), (jpeg, -(2**63)), (jpeg, 2**63 - 1)]
    for item in [*pairs, [jpeg, 7], (7, jpeg), (jpeg, 7, 8), (jpeg, "7")]:
        record = encode_item(item)
        cut = items.head_size(record[:512])
        back = decoder((record[:cut], record[cut:]))
        assert back == item == decode_item(record[:cut], record[cut:]) and type(back) is type(item)
        assert type(back[0] if isinstance(item[0], bytes) else back[1]) is bytes
    record = encode_item((jpeg, 7))
    cut = items.head_size(record[:512])
    assert cut == len(items._PAIR_HEAD) + 8  # the layout the decoder knows
    damaged = bytearray(record[:cut])
    damaged[13] = ord("B")  # the body's tag: no longer the known layout
    with pytest.raises(ValueError, match="truncated; the sample is corrupt"):
        decoder((bytes(damaged), record[cut:]))


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


@pytest.mark.parametrize("n", [0, 1, 3])
def test_index_mode_with_fewer_samples_than_ranks_is_the_samplers_behaviour(n):
    """As ShuffleSampler and DistributedSampler: fewer samples than ranks pad by repeating, none
    yields nothing (ShuffledData refused both); a strategy that needs a sample per rank is refused
    with the sampler's words."""
    from reshuffle import ShuffleSampler

    dataset = TensorDataset(torch.arange(n))
    for rank in range(4):
        data = ShuffledData(dataset, mode="index", rank=rank, world_size=4, seed=3)
        sampler = ShuffleSampler(dataset, 4, rank, seed=3)
        data.set_epoch(2)
        sampler.set_epoch(2)
        assert len(data.sampler) == len(sampler) == (1 if n else 0)
        assert [int(i) for batch in data.loader(batch_size=2) for i in batch[0]] == list(sampler)
    with pytest.raises(ValueError, match="leave ranks without a sample of their own"):
        ShuffledData(dataset, mode="index", rank=0, world_size=4, strategy="partial", fraction=0.1)
    with pytest.raises(ValueError, match="no planner"):
        ShuffledData(dataset, mode="index", rank=0, world_size=4).planner.plan(0)


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
    loader = data.loader(batch_size=8, num_workers=2, persistent_workers=True)
    seen = {}
    for epoch in range(start, epochs):
        data.set_epoch(epoch)
        if mode == "store":  # its batches announce the next ones of this order (persistent workers:
            # of the order they started with; a batch not found there announces only its own)
            assert np.array_equal(data.dataset._order, data.sampler.indices())
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


class NotReadAgain(Pictures):
    """The same dataset, but reading an item fails: a resized job must not restage from it."""

    def __getitem__(self, index: int):
        raise AssertionError(f"sample {index} was read from the source")


def _epochs_then_save(rank, world, root, checkpoint, epochs, source_readable, strategy="partial"):
    """A trainer-like loop: resume from ``checkpoint`` when it exists, train ``epochs`` epochs
    (reading every item through the store), end each epoch (the exchange into the next one is
    prepared everywhere) and save the state on rank 0. Returns per epoch the ids and whether every
    item was intact."""
    options = {"fraction": 0.25} if strategy == "partial" else {}
    data = ShuffledData(
        Pictures() if source_readable else NotReadAgain(), root, strategy=strategy, partition="label-sorted",
        seed=11, epochs=6, chunk_mb=0.001, **options,
    )  # fmt: skip
    start = 0
    if os.path.exists(checkpoint):
        data.load_state_dict(torch.load(checkpoint, weights_only=True))
        start = data.epoch + 1
    seen = {}
    for epoch in range(start, start + epochs):
        data.set_epoch(epoch)
        ids = [int(i) for i in data.sampler]
        items = [data.dataset[i] for i in ids]
        intact = all(
            item["caption"] == f"#{i}" and label == i % 7 for i, (item, label) in zip(ids, items, strict=True)
        )
        data.end_epoch()
        seen[epoch] = (ids, intact)
        state = data.state_dict()
        if rank == 0:
            torch.save(state, checkpoint + ".tmp")
            os.replace(checkpoint + ".tmp", checkpoint)
    data.close()
    return seen


@pytest.mark.slow
@pytest.mark.parametrize(
    ("before", "after", "strategy"), [(4, 2, "partial"), (2, 3, "partial"), (3, 2, "local"), (2, 3, "global")]
)
def test_stores_resized_to_another_number_of_ranks_through_the_exchange(tmp_path, before, after, strategy):
    """A store-mode job of ``before`` ranks trains 2 epochs; it resumes with ``after`` ranks into a
    new store_dir: the new stores are filled from the old ones through the exchange (reading the
    source again fails), every sample is held by exactly one rank, intact, and the next epochs
    train the plan ``after`` ranks would have had, their exchanges included. The old stores are
    left as they were."""
    old, new, checkpoint = tmp_path / "old", tmp_path / "new", str(tmp_path / "state.pt")
    run_ranks(_epochs_then_save, before, str(old), checkpoint, 2, True, strategy, timeout=240)
    resumed = run_ranks(_epochs_then_save, after, str(new), checkpoint, 2, False, strategy, timeout=240)
    options = {"fraction": 0.25} if strategy == "partial" else {}
    planner = ShufflePlanner(
        NUM, after, strategy=strategy, partition="label-sorted", labels=Pictures().targets, seed=11, **options
    )
    for rank in range(after):
        assert sorted(resumed[rank]) == [2, 3]
        for epoch in (2, 3):
            ids, intact = resumed[rank][epoch]
            assert intact and ids == planner.plan(epoch).indices(rank).tolist()
    # left as they were: committed at epoch 1 with the exchange into epoch 2 prepared; likewise
    # the new ones, whose last end_epoch prepared epoch 4 (a next set_epoch would commit it)
    for root, pending in ((old, 2), (new, 4)):
        problems = verify_store(root)
        assert problems and all(f"exchange into epoch {pending} is in flight" in p for p in problems)
        assert damage(problems) == []  # in flight, not damage: verify exits 3
    for root, world in ((new, after), (old, before)):
        held = np.concatenate([RankStore.open(root, r).ids for r in range(world)])
        assert np.array_equal(np.sort(held), np.arange(NUM))  # every sample exactly once


@pytest.mark.slow
def test_a_resize_whose_old_stores_no_rank_sees_is_refused_by_name(tmp_path):
    """The old stores moved away (a node-local store_dir on a node that is gone): every rank
    fails with an error naming the old ranks nobody sees, and nothing is written."""
    old, new, checkpoint = tmp_path / "old", tmp_path / "new", str(tmp_path / "state.pt")
    run_ranks(_epochs_then_save, 2, str(old), checkpoint, 1, True, timeout=240)
    (old / "rank-00001").rename(tmp_path / "elsewhere")
    outcomes = launch(_epochs_then_save, 3, str(new), checkpoint, 1, False, timeout=240)
    assert all(not outcome.ok for outcome in outcomes)
    assert "no rank of this job sees the old store(s) of rank(s) [1]" in (outcomes[0].error or "")
    assert not list(new.glob("rank-*/manifest.json"))


@pytest.mark.slow
def test_a_resize_cut_short_is_redone_for_the_ranks_whose_new_store_never_committed(tmp_path):
    """A resize from 2 to 3 ranks after which one new rank's store is lost (as if that rank died
    before its first commit): resuming from the same state again rebuilds that store from the old
    ones, keeps the two that committed, and trains the 3-rank plan with every sample intact."""
    old, new, checkpoint = tmp_path / "old", tmp_path / "new", str(tmp_path / "state.pt")
    run_ranks(_epochs_then_save, 2, str(old), checkpoint, 2, True, timeout=240)
    saved = Path(checkpoint).read_bytes()
    run_ranks(_epochs_then_save, 3, str(new), checkpoint, 1, False, timeout=240)
    Path(checkpoint).write_bytes(saved)
    shutil.rmtree(new / "rank-00001")
    again = run_ranks(_epochs_then_save, 3, str(new), checkpoint, 2, False, timeout=240)
    planner = ShufflePlanner(
        NUM,
        3,
        strategy="partial",
        fraction=0.25,
        partition="label-sorted",
        labels=Pictures().targets,
        seed=11,
    )
    for rank in range(3):
        for epoch in (2, 3):
            ids, intact = again[rank][epoch]
            assert intact and ids == planner.plan(epoch).indices(rank).tolist()


def _five_partial_epochs(rank, world, root):
    from reshuffle.store.space import allocated_bytes

    dataset = TensorDataset(torch.randint(0, 256, (400, 65536), dtype=torch.uint8), torch.arange(400) % 10)
    data = ShuffledData(dataset, root, strategy="partial", fraction=0.1, seed=0, epochs=5, chunk_mb=1)
    held = []
    for epoch in range(5):
        data.set_epoch(epoch)
        for _ in data.loader(batch_size=64):
            pass
        data.end_epoch()  # the next epoch's arrivals are written: the store's peak
        store = data.store
        live = int(store.records["length"].sum())
        held.append((allocated_bytes(store.directory), live, (store.pack_dir / "reserve.bin").exists()))
    data.close()
    return held


@pytest.mark.slow
def test_storage_over_five_partial_epochs_stays_within_one_plus_q_and_no_reserve_is_left(tmp_path):
    """2 gloo ranks, partial 0.1, 5 epochs of 64 KiB samples: at its peak in every epoch (the
    next epoch's arrivals written beside the samples still to be sent) a rank's store takes at
    most (1 + Q) times its live bytes plus one exchange chunk, and after the last epoch's commit
    no space reserved ahead is left (it used to stay, sized for an exchange that never comes)."""
    chunk = 2**20
    for held in run_ranks(_five_partial_epochs, 2, str(tmp_path / "store"), timeout=180):
        for allocated, live, _ in held:
            assert allocated <= 1.1 * live + chunk, (allocated, live)
        assert [reserved for _, _, reserved in held] == [False] * 5
