"""Virtual ranks: one process reproduces M-rank DDP exactly."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from reshuffle.config import load_run_config
from reshuffle.models.virtual import GhostBatchNorm, RankDropout, set_groups, virtualize
from reshuffle.train.checkpoint import Checkpoints
from reshuffle.train.launch import launch

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SMALL = [
    "data.synthetic.num_samples=240", "data.synthetic.test_samples=64", "train.batch_size=8",
    "train.epochs=2", "model.width=8", "train.deterministic=true", "log.step_losses=true",
    "log.every_steps=0", "shuffle.strategy=partial", "shuffle.fraction=0.25",
    "shuffle.partition=label-sorted",
]  # fmt: skip


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def final_parameters(run: Path) -> dict[str, torch.Tensor]:
    state = Checkpoints.load(Checkpoints(run / "checkpoints", 2).latest())["model"]
    return {k: v for k, v in state.items() if "rank_states" not in k}


# ----------------------------------------------------------------------------- layers


def test_ghost_batchnorm_normalises_each_rank_alone_and_keeps_rank_0s_running_stats():
    torch.manual_seed(0)
    x = torch.randn(12, 3, 5, 5) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    x[4:] += 5.0  # ranks with different data
    plain = nn.BatchNorm2d(3)
    ghost = virtualize(nn.Sequential(nn.BatchNorm2d(3)), norm="batch", dropout_seeds=[])[0]
    assert isinstance(ghost, GhostBatchNorm)
    set_groups(ghost, 3)
    out = ghost(x)
    per_rank = [nn.BatchNorm2d(3) for _ in range(3)]
    expected = torch.cat([bn(x[4 * r : 4 * r + 4]) for r, bn in enumerate(per_rank)])
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(ghost.running_mean, per_rank[0].running_mean)
    assert torch.allclose(ghost.running_var, per_rank[0].running_var)
    assert int(ghost.num_batches_tracked) == 1
    set_groups(ghost, 1)
    assert torch.allclose(ghost(x), nn.BatchNorm2d(3).train()(x) * 0 + plain(x), atol=1e-6)


def test_rank_dropout_draws_each_slice_from_that_ranks_stream():
    seeds = [11, 12]
    layer = RankDropout(0.5, seeds)
    layer.groups = 2
    x = torch.ones(2 * 4, 6)
    out = layer(x)
    for rank, seed in enumerate(seeds):
        torch.manual_seed(seed)
        assert torch.equal(out[4 * rank : 4 * rank + 4], nn.functional.dropout(torch.ones(4, 6), 0.5, True))


# ----------------------------------------------------------------------------- equivalence with real DDP


def _real(tmp_path: Path, world: int, norm: str) -> Path:
    name = f"real-{world}-{norm}"
    result = subprocess.run(
        [sys.executable, "-m", "reshuffle", "run", str(CONFIGS / "smoke.yaml"), f"log.dir={tmp_path}",
         f"name={name}", "--nproc", str(world), f"model.norm={norm}", *SMALL],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return tmp_path / name


def _virtual(tmp_path: Path, world: int, norm: str, *extra: str) -> Path:
    name = f"virtual-{world}-{norm}"
    config = load_run_config(
        CONFIGS / "smoke.yaml",
        [
            f"log.dir={tmp_path}",
            f"name={name}",
            f"model.norm={norm}",
            f"dist.virtual_ranks={world}",
            *SMALL,
            *extra,
        ],
    )
    assert launch(config, None) == 0
    return tmp_path / name


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("norm", ["none", "batch", "sync-batch"])
def test_virtual_ranks_reproduce_real_ddp(tmp_path, world, norm):
    real, virtual = _real(tmp_path, world, norm), _virtual(tmp_path, world, norm)
    steps_real, steps_virtual = rows(real / "metrics" / "steps.csv"), rows(virtual / "metrics" / "steps.csv")
    assert len(steps_real) == len(steps_virtual) > 10
    for a, b in zip(steps_real, steps_virtual, strict=True):
        assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-4, abs=1e-5)
    params_real, params_virtual = final_parameters(real), final_parameters(virtual)
    assert params_real.keys() == params_virtual.keys()
    for key, value in params_real.items():
        assert torch.allclose(value.float(), params_virtual[key].float(), rtol=1e-4, atol=1e-5), key
    for rank in range(world):  # the same samples, in the same order, on every rank
        a, b = rows(real / "metrics" / f"rank-{rank}.csv"), rows(virtual / "metrics" / f"rank-{rank}.csv")
        assert [r["order_sha"] for r in a] == [r["order_sha"] for r in b]
    epochs_real, epochs_virtual = (
        rows(real / "metrics" / "epochs.csv"),
        rows(virtual / "metrics" / "epochs.csv"),
    )
    assert list(epochs_real[0]) == list(epochs_virtual[0])  # the same columns
    assert [r["virtual"] for r in epochs_virtual] == [str(world)] * 2
    assert epochs_virtual[0]["fw_bw_s"] == epochs_virtual[0]["io_s"] == ""  # not measurable in one process
    for key in ("test_acc", "label_js", "samples_moved"):
        assert float(epochs_real[-1][key]) == pytest.approx(float(epochs_virtual[-1][key]), abs=1e-4), key


def test_chunked_forwards_give_the_same_result(tmp_path):
    whole = _virtual(tmp_path / "a", 4, "batch")
    chunked = _virtual(tmp_path / "b", 4, "batch", "dist.virtual_batch_limit=16")  # 2 ranks per forward
    for key, value in final_parameters(whole).items():
        assert torch.allclose(value.float(), final_parameters(chunked)[key].float(), rtol=1e-4, atol=1e-6), (
            key
        )


@pytest.mark.slow
def test_a_thousand_virtual_ranks_train_in_bounded_memory(tmp_path):
    config = load_run_config(
        CONFIGS / "smoke.yaml",
        [f"log.dir={tmp_path}", "name=k", "dist.virtual_ranks=1024", "train.batch_size=8", "train.epochs=1",
         "data.synthetic.num_samples=16384", "data.synthetic.test_samples=256", "model.width=8",
         "shuffle.strategy=partial", "shuffle.fraction=0.1", "dist.virtual_batch_limit=2048"],
    )  # fmt: skip
    assert launch(config, None) == 0
    epochs = rows(tmp_path / "k" / "metrics" / "epochs.csv")
    assert epochs[0]["virtual"] == "1024" and int(epochs[0]["samples"]) == 16384
    assert len(list((tmp_path / "k" / "metrics").glob("rank-*.csv"))) == 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
    assert peak < 4 * 2**30, f"peak memory {peak / 2**30:.1f} GiB"
