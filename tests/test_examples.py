"""The examples run as a user runs them: a plain DDP script on reshuffle's public data path."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reshuffle.store import verify_store
from reshuffle.train.distributed import free_port
from reshuffle.train.metrics import order_hash
from spawn import run_command

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _torchrun(
    script: Path, *arguments: str, nproc: int = 2, timeout: float = 240
) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", str(script), *arguments]  # fmt: skip
    return run_command(command, timeout, {**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def reference_orders(tmp_path_factory, fashion_mnist) -> dict[int, dict[int, str]]:
    """``reshuffle run``'s order hash per (rank, epoch) for the examples' data, seed, strategy and
    partition (2 gloo ranks, store mode, 3 epochs)."""
    log_dir = tmp_path_factory.mktemp("reference")
    plan = ["shuffle.strategy=partial", "shuffle.fraction=0.1", "shuffle.partition=label-sorted"]
    run = run_command(
        [sys.executable, "-m", "reshuffle", "run", str(ROOT / "configs/fashion-mnist.yaml"), "--nproc", "2",
         f"log.dir={log_dir}", "name=reference", "seed=0", "train.epochs=3", f"data.train_limit={LIMIT}",
         "data.test_limit=200", "shuffle.mode=store", "model.width=8", "train.workers=0", *plan],
        300, {**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    expected = {}
    for rank in (0, 1):
        with open(log_dir / "reference" / "metrics" / f"rank-{rank}.csv", newline="") as handle:
            expected[rank] = {int(r["epoch"]): r["order_sha"] for r in csv.DictReader(handle)}
    return expected


LIMIT = 1500


def _python(script: Path, *arguments: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """As Lightning's users start it: one process, which starts the other ranks itself."""
    command = [sys.executable, str(script), *arguments]
    return run_command(command, timeout, {**os.environ, "OMP_NUM_THREADS": "1"})


LAUNCH = {"ddp_store.py": _torchrun, "accelerate_store.py": _torchrun, "lightning_store.py": _python,
          "stateful_store.py": _torchrun}  # fmt: skip


@pytest.mark.parametrize("example", ["accelerate_store.py", "ddp_store.py", "lightning_store.py"])
def test_example_trains_the_ids_reshuffle_run_trains_and_resumes(
    example, tmp_path, fashion_mnist, reference_orders
):
    """Each example (2 gloo ranks, store mode) trains every rank on exactly the ids, in the order,
    that ``reshuffle run`` trains on for the same data, seed, strategy and partition; run again
    with more epochs it resumes from its checkpoint (Lightning's: the DataModule's state in
    last.ckpt); the stores verify. The example prints from one process only, which shows its
    framework saw one job of 2 ranks (not 2 jobs of 1)."""
    launch = LAUNCH[example]
    store, ids = tmp_path / "example" / "store", tmp_path / "example" / "ids"
    common = [
        "--data",
        str(fashion_mnist),
        "--store",
        str(store),
        "--limit",
        str(LIMIT),
        "--ids-out",
        str(ids),
    ]
    first = launch(ROOT / "examples" / example, *common, "--epochs", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert [line.split(":")[0] for line in first.stdout.splitlines()] == ["epoch 0", "epoch 1"], first.stdout
    trained = {rank: torch.load(f"{ids}.rank{rank}") for rank in (0, 1)}
    second = launch(ROOT / "examples" / example, *common, "--epochs", "3")  # resumes at epoch 2
    assert second.returncode == 0, second.stderr[-3000:]
    for rank in (0, 1):
        resumed = torch.load(f"{ids}.rank{rank}")
        assert sorted(resumed) == [2]
        trained[rank].update(resumed)
        assert sorted(trained[rank]) == [0, 1, 2]
        for epoch, order in trained[rank].items():
            assert f"{order_hash(order):013x}" == reference_orders[rank][epoch], (rank, epoch)
    assert verify_store(store) == []


# (example, options of both runs, steps before the stop): each stops inside epoch 1 (12 steps
# per epoch of 750 samples per rank at batch 64), right after a step checkpoint
STOPPED_MID_EPOCH = {
    "stateful_store.py": ([], 18),  # StatefulDataLoader with 2 workers, a checkpoint every 5 steps and at 18
    "lightning_store.py": (["--every", "5"], 15),  # Lightning's step checkpoints
}


@pytest.mark.parametrize("example", sorted(STOPPED_MID_EPOCH))
def test_an_example_stopped_mid_epoch_resumes_at_the_next_batch(
    example, tmp_path, fashion_mnist, reference_orders
):
    """The example (2 CPU ranks, store mode) stopped mid-epoch 1 right after a checkpoint, then
    started again: the two runs together train every rank on exactly the ids, in the order,
    ``reshuffle run`` trains on (nothing of epoch 1 repeated or skipped); the stores verify.
    Lightning's restart from a mid-epoch checkpoint skips on_train_epoch_start: its store was
    never opened before the example also selected the epoch in on_train_start."""
    options, stop = STOPPED_MID_EPOCH[example]
    store, ids = tmp_path / "example" / "store", tmp_path / "example" / "ids"
    common = ["--data", str(fashion_mnist), "--store", str(store), "--limit", str(LIMIT), "--epochs", "3",
              *options]  # fmt: skip
    first = LAUNCH[example](ROOT / "examples" / example, *common, "--stop-after", str(stop), "--ids-out",
                            f"{ids}-first")  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    second = LAUNCH[example](ROOT / "examples" / example, *common, "--ids-out", f"{ids}-second")
    assert second.returncode == 0, second.stderr[-3000:]
    for rank in (0, 1):
        before, after = torch.load(f"{ids}-first.rank{rank}"), torch.load(f"{ids}-second.rank{rank}")
        assert sorted(before) == [0, 1] and sorted(after) == [1, 2] and len(before[1]) == (stop - 12) * 64
        trained = {0: before[0], 1: before[1] + after[1], 2: after[2]}
        for epoch, order in trained.items():
            assert f"{order_hash(order):013x}" == reference_orders[rank][epoch], (rank, epoch)
    assert verify_store(store) == []


def test_a_byte_flipped_in_a_kept_sample_stops_the_users_loop_before_its_checkpoint(tmp_path, fashion_mnist):
    """examples/ddp_store.py (2 gloo ranks, DataLoader workers): after 2 epochs, one byte of a
    sample rank 1 keeps into epoch 2 is flipped on its disk. Run on to 3 epochs, the loop stops in
    epoch 2, on the read that would train it, with CorruptSampleError naming the sample; the
    checkpoint is still epoch 1's, and `reshuffle verify` names the damage."""
    import numpy as np

    from reshuffle import ShufflePlanner
    from reshuffle.store import RankStore
    from reshuffle.store.format import pack_name

    store = tmp_path / "example" / "store"
    common = ["--data", str(fashion_mnist), "--store", str(store), "--limit", str(LIMIT)]
    first = _torchrun(ROOT / "examples" / "ddp_store.py", *common, "--epochs", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    rank1 = RankStore.open(store, 1)
    planner = ShufflePlanner(LIMIT, 2, strategy="partial", fraction=0.1, partition="label-sorted",
                             labels=_labels(fashion_mnist), seed=0)  # fmt: skip
    kept = np.intersect1d(rank1.ids, planner.plan(2).holdings(1))
    bad = int(kept[len(kept) // 2])
    record = rank1.records[rank1.position(bad)[0]]
    pack = rank1.pack_dir / pack_name(int(record["pack"]))
    data = bytearray(pack.read_bytes())
    data[int(record["offset"]) + int(record["length"]) // 2] ^= 0xFF
    pack.write_bytes(bytes(data))
    second = _torchrun(ROOT / "examples" / "ddp_store.py", *common, "--epochs", "3")
    assert second.returncode != 0
    assert "CorruptSampleError" in second.stderr and f"sample {bad} in this rank's own store" in second.stderr
    saved = torch.load(tmp_path / "example" / "ckpt.pt", weights_only=True)
    assert saved["epoch"] == 1
    assert any(f"sample {bad}" in line for line in verify_store(store))


def _labels(fashion_mnist: Path):
    import gzip

    import numpy as np

    with gzip.open(fashion_mnist / "train-labels-idx1-ubyte.gz") as handle:
        return np.frombuffer(handle.read(), np.uint8, offset=8)[:LIMIT].astype(np.int64)
