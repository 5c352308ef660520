"""Two "nodes" on this host: two ``torchrun --nnodes 2`` invocations (static rendezvous), each with
its own store and log folders, as on a cluster with node-local disks and no shared file system.
A node is killed (its agent and its rank, SIGKILL) right after the checkpoint that precedes a
commit; the job resumes from node-local logs and loses no sample (issue 17 #10)."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reshuffle.store import verify_store
from reshuffle.train.distributed import free_port
from spawn import kill_tree

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SETTINGS = [
    "name=mn", "shuffle.mode=store", "shuffle.fraction=0.5", "data.synthetic.num_samples=2400",
    "data.synthetic.sample_bytes=16384", "data.test_limit=64", "dist.timeout_s=20", "train.epochs=6",
]  # fmt: skip


def _node(root: Path, node: int, port: int, *extra: str) -> subprocess.Popen:
    folder = root / f"node-{node}"
    folder.mkdir(exist_ok=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
        "-m", "reshuffle", "run", str(CONFIGS / "smoke.yaml"), f"log.dir={folder}",
        f"shuffle.store_dir={folder / 'store'}", *SETTINGS, *extra,
    ]  # fmt: skip
    output = open(folder / "torchrun.out", "a")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def _finish(nodes: list[subprocess.Popen]) -> list[subprocess.Popen]:
    """Wait for every node's torchrun to end (a hard 300 s each); kill what is left."""
    try:
        for node in nodes:
            node.wait(timeout=300)
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_tree(node)
    return nodes


def _wait_for(condition, deadline_s: float, what: str) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@pytest.mark.slow
def test_a_node_killed_before_a_commit_resumes_from_node_local_logs_and_loses_nothing(tmp_path):
    port = free_port()
    nodes = [_node(tmp_path, k, port) for k in (0, 1)]
    log0 = tmp_path / "node-0" / "mn" / "logs" / "rank-0.log"
    try:
        # every node keeps its own checkpoints (log.dir is node-local); node 1's appears after
        # every rank prepared the exchange into epoch 2, before the stores commit it
        checkpoint = tmp_path / "node-1" / "mn" / "checkpoints" / "epoch-0002-step-0000000.pt"
        _wait_for(lambda: checkpoint.exists() or any(n.poll() is not None for n in nodes), 180, "epoch 2")
        assert checkpoint.exists(), _text(tmp_path / "node-1" / "torchrun.out")[-3000:]
        kill_tree(nodes[1])
        killed = time.monotonic()
        _wait_for(lambda: "ERROR" in _text(log0), 60, "node 0's rank to fail")
        assert time.monotonic() - killed < 20 + 15  # dist.timeout_s and the naming's wait, at most
        assert "rank 1" in _text(log0).split("ERROR", 1)[1].splitlines()[0], _text(log0)[-2000:]
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_tree(node)  # torchrun's agent waits 300 s for a lost peer agent at exit
    port = free_port()
    resumed = _finish([_node(tmp_path, k, port, "--resume") for k in (0, 1)])
    outputs = [_text(tmp_path / f"node-{k}" / "torchrun.out")[-3000:] for k in (0, 1)]
    assert [node.returncode for node in resumed] == [0, 0], outputs
    stores = [tmp_path / f"node-{k}" / "store" for k in (0, 1)]
    assert verify_store(*stores) == []
    assert verify_store(stores[1], node=True) == []
    assert any("rank 0: directory rank-00000 is missing" in p for p in verify_store(stores[1]))
    with open(tmp_path / "node-0" / "mn" / "metrics" / "epochs.csv", newline="") as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == [str(e) for e in range(6)]

    # node 1 is replaced by a new one: no logs, no checkpoints, a new (empty) scratch directory.
    # It receives the checkpoint from rank 0 and restages its share from the source at the
    # epoch the other store is at; the job goes on.
    shutil.rmtree(tmp_path / "node-1")
    port, scratch = free_port(), tmp_path / "node-1" / "new-scratch"
    more = _finish([
        _node(tmp_path, 0, port, "--resume", "train.epochs=8"),
        _node(tmp_path, 1, port, "--resume", "train.epochs=8", f"shuffle.store_dir={scratch}"),
    ])  # fmt: skip
    log1 = _text(tmp_path / "node-1" / "mn" / "logs" / "rank-1.log")
    assert [node.returncode for node in more] == [0, 0], log1[-3000:]
    assert "received epoch-0006-step-0000000.pt from rank 0" in log1 and "rank 1: staged" in log1
    assert "done: 8 epochs" in _text(tmp_path / "node-0" / "torchrun.out")  # said once, by rank 0
    assert "done:" not in _text(tmp_path / "node-1" / "torchrun.out")
    assert (tmp_path / "node-1" / "mn" / "checkpoints" / "epoch-0008-step-0000000.pt").exists()
    assert verify_store(stores[0], scratch) == []
