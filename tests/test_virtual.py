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
from spawn import run_command

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


def _real(tmp_path: Path, world: int, norm: str, *extra: str) -> Path:
    name = f"real-{world}-{norm}"
    result = run_command(
        [sys.executable, "-m", "reshuffle", "run", str(CONFIGS / "smoke.yaml"), f"log.dir={tmp_path}",
         f"name={name}", "--nproc", str(world), f"model.norm={norm}", *SMALL, *extra],
        240, {**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return tmp_path / name


def _virtual(tmp_path: Path, world: int, norm: str, *extra: str, name: str = "") -> Path:
    name = name or f"virtual-{world}-{norm}"
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


def _same_training(a: Path, b: Path) -> None:
    steps_a, steps_b = rows(a / "metrics" / "steps.csv"), rows(b / "metrics" / "steps.csv")
    assert len(steps_a) == len(steps_b) > 10
    for x, y in zip(steps_a, steps_b, strict=True):
        assert float(x["loss"]) == pytest.approx(float(y["loss"]), rel=1e-4, abs=1e-5)
    params_a, params_b = final_parameters(a), final_parameters(b)
    for key, value in params_a.items():
        assert torch.allclose(value.float(), params_b[key].float(), rtol=1e-4, atol=1e-5), key


@pytest.mark.slow
def test_grouped_sync_batchnorm_in_virtual_ranks_matches_real_ranks(tmp_path):
    """model.sync_group=2 over 4 ranks: BatchNorm statistics per pair of ranks. Virtual ranks
    (forwarded 2 ranks at a time: whole groups) train exactly as 4 real gloo ranks with process
    groups; sync_group=node with 2 ranks per node is the same; all-rank sync differs."""
    grouped = ["model.sync_group=2"]
    real = _real(tmp_path, 4, "sync-batch", *grouped)
    virtual = _virtual(tmp_path, 4, "sync-batch", *grouped, "dist.virtual_batch_limit=16")
    _same_training(real, virtual)
    node = _virtual(tmp_path, 4, "sync-batch", "model.sync_group=node", "dist.ranks_per_node=2", name="node")
    _same_training(virtual, node)
    everyone = _virtual(tmp_path, 4, "sync-batch", name="all")
    assert (
        rows(everyone / "metrics" / "steps.csv")[-1]["loss"]
        != rows(virtual / "metrics" / "steps.csv")[-1]["loss"]
    )


@pytest.mark.slow
def test_node_aware_plans_train_alike_in_store_mode_and_virtual_ranks(tmp_path):
    """shuffle.level=node, 2 nodes of 2 ranks: 4 real ranks in store mode (the re-deal within a
    node and the cross-node partial exchange move through the stores) train exactly as 4 virtual
    ranks; only a quarter of the moves cross a node, and the stores verify."""
    node = ["shuffle.level=node", "dist.ranks_per_node=2"]
    real = _real(tmp_path, 4, "batch", *node, "shuffle.mode=store", f"shuffle.store_dir={tmp_path / 'st'}")
    virtual = _virtual(tmp_path, 4, "batch", *node)
    _same_training(real, virtual)
    for rank in range(4):
        a, b = rows(real / "metrics" / f"rank-{rank}.csv"), rows(virtual / "metrics" / f"rank-{rank}.csv")
        assert [r["order_sha"] for r in a] == [r["order_sha"] for r in b]
    first_real, first_virtual = (
        rows(real / "metrics" / "epochs.csv")[0],
        rows(virtual / "metrics" / "epochs.csv")[0],
    )
    for key in ("samples_moved", "bytes_across_nodes"):
        assert first_real[key] == first_virtual[key], key
    moved, across = int(first_real["samples_moved"]), int(first_real["bytes_across_nodes"])
    # per node: Q * 120 = 30 leave the node; the rest of the moves is the re-deal within it
    assert across == 2 * 30 * float(first_real["bytes_planned"]) / moved and moved > 4 * 30
    verify = subprocess.run([sys.executable, "-m", "reshuffle", "verify", str(tmp_path / "st")],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_sync_groups_must_divide_the_ranks_and_node_needs_its_size():
    from reshuffle.config import ConfigError
    from reshuffle.models.sync_batchnorm import sync_group_size

    assert sync_group_size("all", 8, None) == 8 and sync_group_size(4, 8, None) == 4
    assert sync_group_size("node", 8, 2) == 2
    with pytest.raises(ConfigError, match="groups of 3 ranks do not divide 8 ranks"):
        sync_group_size(3, 8, None)
    with pytest.raises(ConfigError, match=r"set dist\.ranks_per_node"):
        sync_group_size("node", 8, None)
    model = virtualize(
        nn.Sequential(nn.BatchNorm1d(2)), norm="sync-batch", dropout_seeds=[0], statistics_ranks=2
    )
    with pytest.raises(ValueError, match="split a group of 2 ranks"):
        set_groups(model, 3, 0)


def test_chunked_forwards_give_the_same_result(tmp_path):
    whole = _virtual(tmp_path / "a", 4, "batch")
    chunked = _virtual(tmp_path / "b", 4, "batch", "dist.virtual_batch_limit=16")  # 2 ranks per forward
    single = _virtual(tmp_path / "c", 4, "batch", "dist.virtual_batch_limit=8")  # 1: rank 0's buffers only
    for key, value in final_parameters(whole).items():
        for other in (chunked, single):
            assert torch.allclose(
                value.float(), final_parameters(other)[key].float(), rtol=1e-4, atol=1e-6
            ), key


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
