"""The experiment runner: options in one process, and real multi-rank runs through the CLI."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from reshuffle import memory
from reshuffle.config import ConfigError, dataset_entry, load_run_config, load_system_config
from reshuffle.data.source import DataNotFoundError
from reshuffle.train.checkpoint import Checkpoints
from reshuffle.train.loop import train
from spawn import run_command, run_ranks

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY = [
    "data.synthetic.num_samples=256",
    "data.synthetic.test_samples=64",
    "train.batch_size=32",
    "train.epochs=1",
    "model.width=8",
    "log.every_steps=0",
]


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def run_in_process(tmp_path: Path, *overrides: str, name: str = "run", resume: bool = False) -> Path:
    config = load_run_config(
        CONFIGS / "smoke.yaml", [*TINY, f"log.dir={tmp_path}", f"name={name}", *overrides]
    )
    train(config, load_system_config(None), tmp_path / name, resume=resume)
    return tmp_path / name


def run_cli(tmp_path: Path, *arguments: str, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "reshuffle", "run", str(CONFIGS / "smoke.yaml"), f"log.dir={tmp_path}"]
    return run_command([*command, *arguments], timeout, {**os.environ, "OMP_NUM_THREADS": "1"})


# ----------------------------------------------------------------------------- one process


def test_a_run_writes_config_env_metrics_logs_and_checkpoints(tmp_path):
    run = run_in_process(tmp_path, "train.epochs=2")
    assert load_run_config(run / "config.yaml").train.epochs == 2  # the resolved config, loadable
    environment = json.loads((run / "env.json").read_text())
    assert environment["world_size"] == 1 and environment["backend"] == "gloo" and environment["hosts"]
    assert environment["freed_memory_kept"] == (memory._glibc() is not None)  # auto: on, on the CPU
    assert not memory.in_effect()  # and undone when train() returns
    epochs = rows(run / "metrics" / "epochs.csv")
    assert [r["epoch"] for r in epochs] == ["0", "1"]
    contract = ["epoch", "train_loss", "test_acc", "epoch_s", "io_s", "exchange_s", "exchange_exposed_s",
                "fw_bw_s", "ge_wu_s", "bytes_exchanged"]  # fmt: skip
    assert list(epochs[0])[: len(contract)] == contract
    assert epochs[0]["exchange_s"] == "" and epochs[0]["exchange_exposed_s"] == ""  # index mode: not measured
    assert float(epochs[1]["train_loss"]) < float(epochs[0]["train_loss"])
    assert rows(run / "metrics" / "rank-0.csv")[0]["rank"] == "0"
    assert "rank 0: pid" in (run / "logs" / "rank-0.log").read_text()
    assert [p.name for p in Checkpoints(run / "checkpoints", 2).paths()] == [
        "epoch-0001-step-0000000.pt",
        "epoch-0002-step-0000000.pt",
    ]
    summary = json.loads((run / "summary.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert summary["status"] == "completed"  # strict JSON: no bare NaN (index mode has no exchange)
    assert summary["final"]["exchange_s"] is None


class Spy:
    """What the trainer called while a run trained in this process."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import reshuffle.train.loop as loop_module
        from reshuffle.train import step as step_module

        self.compiled: list[str] = []
        self.autocast: list[torch.dtype] = []
        self.workers: list[int] = []
        self.dropout: list[float] = []
        self.explicit_reductions = 0
        self.recalibrations = 0
        self.mixups = 0
        self.lrs: list[float] = []
        self._wrap(
            monkeypatch, torch, "compile", lambda *a, backend="inductor", **k: self.compiled.append(backend)
        )
        self._wrap(monkeypatch, torch.autocast, "__init__", lambda *a, dtype=None, enabled=True, **k: enabled
                   and self.autocast.append(dtype))  # fmt: skip
        self._wrap(monkeypatch, torch.utils.data.DataLoader, "__init__",
                   lambda *a, num_workers=0, **k: self.workers.append(num_workers))  # fmt: skip
        self._wrap(
            monkeypatch, torch.nn.Dropout, "__init__", lambda _, p=0.5, *a, **k: self.dropout.append(p)
        )
        self._wrap(
            monkeypatch,
            step_module,
            "all_reduce_gradients",
            lambda *a, **k: self._count("explicit_reductions"),
        )
        self._wrap(
            monkeypatch, loop_module, "recalibrate_batchnorm", lambda *a, **k: self._count("recalibrations")
        )
        self._wrap(monkeypatch, step_module, "mixup_draw", lambda *a, **k: self._count("mixups"))
        self._wrap(monkeypatch, loop_module, "lr_at", None, after=self.lrs.append)

    def _count(self, name: str) -> None:
        setattr(self, name, getattr(self, name) + 1)

    @staticmethod
    def _wrap(monkeypatch, owner, name, before, after=None) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if before is not None:
                before(*args, **kwargs)
            result = original(*args, **kwargs)
            if after is not None:
                after(result)
            return result

        monkeypatch.setattr(owner, name, wrapper)


FOUR = ["dist.virtual_ranks=4"]  # partitions and exchanges mean something only with several ranks


@pytest.fixture(scope="module")
def baselines(tmp_path_factory) -> dict:
    """The smoke run with no option (1 epoch, one rank), and with 4 virtual ranks for 2 epochs
    (partial 0.1 as configured, and global): what an ignored option leaves unchanged."""
    return {
        1: run_in_process(tmp_path_factory.mktemp("base"), "train.epochs=1"),
        "partial": run_in_process(tmp_path_factory.mktemp("partial"), "train.epochs=2", *FOUR),
        "global": run_in_process(
            tmp_path_factory.mktemp("global"),
            "train.epochs=2",
            "shuffle.strategy=global",
            "shuffle.fraction=0",
            *FOUR,
        ),
    }


def _final(run: Path, column: str) -> str:
    return rows(run / "metrics" / "epochs.csv")[-1][column]


def _orders(run: Path) -> list[str]:
    return [row["order_sha"] for row in rows(run / "metrics" / "rank-0.csv")]


def _saved(run: Path) -> dict:
    return Checkpoints.load(Checkpoints(run / "checkpoints", 2).latest())


def _model_keys(run: Path) -> set[str]:
    return set(_saved(run)["model"])


def _loss_differs(run, base, column="train_loss") -> bool:
    return _final(run, column) != _final(base[1], column)


def _no_running_stats(run) -> bool:
    return not any("running_mean" in key for key in _model_keys(run))


def _channels_last(run) -> bool:  # every conv weight with more than one input channel
    weights = [w for w in _saved(run)["model"].values() if w.ndim == 4 and w.shape[1] > 1]
    return bool(weights) and all(
        w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in weights
    )


def _adamw_with_decay_and_warmup(run, spy) -> bool:
    optimizer = _saved(run)["optimizer"]
    first_state = next(iter(optimizer["state"].values()))
    return (
        optimizer["param_groups"][0]["weight_decay"] == 0.01
        and "exp_avg" in first_state
        and (spy.lrs[0] < max(spy.lrs))
    )


def _second_epoch_order_differs(run, base) -> bool:
    """The first epoch as ``base`` trains it (a warm-up, or nothing selected yet), the second not."""
    return _orders(run)[0] == _orders(base)[0] and _orders(run)[1] != _orders(base)[1]


# Each option's effect, shown in what the trainer called or against the run without it: an option
# the trainer ignored would leave these exactly as the baseline has them.
OPTION_EFFECTS = [
    (["train.mixup_alpha=0.4"], lambda run, spy, base: spy.mixups > 0 and _loss_differs(run, base)),
    (["train.amp=bf16"], lambda run, spy, base: torch.bfloat16 in spy.autocast),
    (["train.channels_last=true"], lambda run, spy, base: _channels_last(run)),
    (
        ["train.compile=true", "train.compile_backend=aot_eager"],
        lambda run, spy, base: spy.compiled == ["aot_eager"],
    ),
    (["train.workers=2"], lambda run, spy, base: 2 in spy.workers),
    (["model.norm=group"], lambda run, spy, base: _no_running_stats(run) and _loss_differs(run, base)),
    (
        ["model.norm=none", "model.dropout=0.2"],
        lambda run, spy, base: 0.2 in spy.dropout and _no_running_stats(run),
    ),
    (["model.name=mlp"], lambda run, spy, base: _model_keys(run).isdisjoint(_model_keys(base[1]))),
    (
        ["model.name=resnet18", "train.max_steps=3"],
        lambda run, spy, base: "stages.0.conv1.weight" in _model_keys(run),
    ),
    (
        ["model.name=tv:resnet18", "model.width=8", "train.max_steps=2"],
        lambda run, spy, base: "model.layer4.1.conv2.weight" in _model_keys(run),
    ),
    (
        ["train.grad_sync=explicit", "train.bn_recalibrate=true"],
        lambda run, spy, base: (
            spy.explicit_reductions > 0 and spy.recalibrations > 0 and _loss_differs(run, base, "test_loss")
        ),
    ),
    (
        ["train.optimizer=adamw", "train.optimizer_kwargs={weight_decay: 0.01}", "train.warmup_epochs=0.5"],
        lambda run, spy, base: _adamw_with_decay_and_warmup(run, spy),
    ),
    (["train.schedule=step", "train.step_epochs=[0]"], lambda run, spy, base: _loss_differs(run, base, "lr")),
    (
        ["shuffle.strategy=local", "shuffle.fraction=0", "shuffle.partition=label-sorted", *FOUR],
        lambda run, spy, base: (
            float(_final(run, "label_js")) > 0.3 > float(_final(base["partial"], "label_js"))
        ),
    ),
    (["data.name=digits"], lambda run, spy, base: _loss_differs(run, base, "samples")),
    (
        [
            "shuffle.strategy=importance",
            "shuffle.fraction=0",
            "shuffle.warmup_epochs=1",
            "train.epochs=2",
            *FOUR,
        ],
        lambda run, spy, base: _second_epoch_order_differs(run, base["global"]),
    ),
    (
        ["shuffle.select=importance", "train.track_losses=true", "train.epochs=2", *FOUR],
        lambda run, spy, base: _second_epoch_order_differs(run, base["partial"]),
    ),
]


@pytest.mark.parametrize(
    ("options", "took_effect"), OPTION_EFFECTS, ids=[" ".join(o) for o, _ in OPTION_EFFECTS]
)
def test_every_training_option_trains_and_takes_effect(
    tmp_path, options, took_effect, baselines, monkeypatch
):
    """Each option trains, and shows its effect: in what the trainer called (a spy on the
    compile, autocast, DataLoader, dropout, reduction, recalibration, mixup and schedule
    functions), in the checkpoint, or in a metric that differs from the run without it."""
    spy = Spy(monkeypatch)
    run = run_in_process(tmp_path, *options)
    if any(o.startswith("train.max_steps") for o in options):
        assert Checkpoints(run / "checkpoints", 2).latest() is not None
    else:
        metrics = rows(run / "metrics" / "epochs.csv")
        assert (
            len(metrics) == (2 if "train.epochs=2" in options else 1) and float(metrics[0]["train_loss"]) > 0
        )
    assert took_effect(run, spy, baselines)


def test_a_virtual_run_goes_through_the_same_epoch_loop_and_summary_as_a_real_one(tmp_path):
    """One epoch loop for both (train/epochs.py): the same summary.json keys (the virtual run's
    used to lack ``name``), the same per-epoch columns, and max_steps stops both the same way."""
    real = run_in_process(tmp_path, "train.epochs=2", name="real")
    virtual = run_in_process(tmp_path, "train.epochs=2", "dist.virtual_ranks=2", name="virtual")
    summaries = [json.loads((run / "summary.json").read_text()) for run in (real, virtual)]
    assert summaries[0].keys() == summaries[1].keys() and summaries[1]["name"] == "virtual"
    assert summaries[1]["world_size"] == 2 and summaries[1]["status"] == "completed"
    assert (
        rows(real / "metrics" / "epochs.csv")[0].keys() == rows(virtual / "metrics" / "epochs.csv")[0].keys()
    )
    stopped = run_in_process(
        tmp_path, "train.epochs=2", "dist.virtual_ranks=2", "train.max_steps=3", name="stop"
    )
    assert not (stopped / "summary.json").exists() and not (stopped / "metrics" / "epochs.csv").exists()


def test_real_fashion_mnist_trains(tmp_path, fashion_mnist):
    run = run_in_process(
        tmp_path, "data.name=fashion-mnist", "data.train_limit=2048", "data.test_limit=512", "model.width=16"
    )
    assert float(rows(run / "metrics" / "epochs.csv")[0]["test_acc"]) > 0.5  # 10 classes: chance is 0.1


def test_tensorboard_and_wandb_offline_write_their_files(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = run_in_process(tmp_path, "log.tensorboard=true", "log.wandb=offline")
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run / "wandb").glob("offline-run-*"))


def test_bad_settings_fail_before_training_with_the_key_named(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("train.amp=fp16 needs a CUDA device")):
        run_in_process(tmp_path, "train.amp=fp16")
    with pytest.raises(ConfigError, match=re.escape("model.name: unknown model 'vgg'")):
        run_in_process(tmp_path, "model.name=vgg")
    with pytest.raises(ConfigError, match=re.escape("torchvision has no model 'nope'")):
        run_in_process(tmp_path, "model.name=tv:nope")
    with pytest.raises(ConfigError, match=re.escape("train.optimizer_kwargs")):
        run_in_process(tmp_path, "train.optimizer_kwargs={betas: 3}", "train.optimizer=sgd")
    with pytest.raises(ConfigError, match=re.escape("data.name: unknown dataset 'imagenet'")):
        run_in_process(tmp_path, "data.name=imagenet")


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    run_in_process(tmp_path, "train.max_steps=3", name="r")
    with pytest.raises(ConfigError, match=re.escape("different settings for train.lr")):
        run_in_process(tmp_path, "train.max_steps=3", "train.lr=0.5", name="r", resume=True)
    with pytest.raises(ConfigError, match="already holds a run with checkpoints; continue it with --resume"):
        run_in_process(tmp_path, "train.max_steps=3", name="r")  # a fresh run never overwrites a saved one


# ----------------------------------------------------------------------------- real ranks


@pytest.mark.slow
def test_corgipile_trains_its_block_order_in_index_and_store_mode(tmp_path):
    """corgipile through the trainer: the same per-rank order in both modes, and not local's
    (the same partitions, another order)."""
    common = ["--nproc", "2", "shuffle.fraction=0", "shuffle.partition=contiguous", "shuffle.block_size=32",
              "shuffle.buffer_blocks=2"]  # fmt: skip
    for name, extra in (("index", []), ("store", ["shuffle.mode=store"])):
        result = run_cli(tmp_path, *common, f"name={name}", "shuffle.strategy=corgipile", *extra)
        assert result.returncode == 0, result.stderr[-2000:]
    assert run_cli(tmp_path, *common, "name=local", "shuffle.strategy=local").returncode == 0
    for rank in (0, 1):
        index, store, local = (
            rows(tmp_path / n / "metrics" / f"rank-{rank}.csv") for n in ("index", "store", "local")
        )
        assert [r["order_sha"] for r in index] == [r["order_sha"] for r in store]
        assert [r["order_sha"] for r in index] != [r["order_sha"] for r in local]


@pytest.mark.slow
def test_two_ranks_index_and_store_mode_train_on_identical_per_rank_orders(tmp_path):
    common = ["--nproc", "2", "train.deterministic=true", "shuffle.strategy=partial", "shuffle.fraction=0.2"]
    for mode in ("index", "store"):
        result = run_cli(tmp_path, *common, f"name={mode}", f"shuffle.mode={mode}")
        assert result.returncode == 0, result.stderr
    for rank in (0, 1):
        index = rows(tmp_path / "index" / "metrics" / f"rank-{rank}.csv")
        store = rows(tmp_path / "store" / "metrics" / f"rank-{rank}.csv")
        assert [r["order_sha"] for r in index] == [r["order_sha"] for r in store]
        assert [r["train_loss"] for r in index] == [r["train_loss"] for r in store]
    store_epochs = rows(tmp_path / "store" / "metrics" / "epochs.csv")
    k = round(0.2 * 1024)
    assert int(store_epochs[0]["bytes_exchanged"]) == 2 * k * 784  # both ranks, k samples of 784 bytes
    assert float(store_epochs[0]["exchange_s"]) > 0
    verify = subprocess.run(
        [sys.executable, "-m", "reshuffle", "verify", str(tmp_path / "store" / "store")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verify.returncode == 0, verify.stdout


RESUME = [
    "--nproc", "2", "train.deterministic=true", "train.epochs=3", "data.synthetic.num_samples=1024",
    "shuffle.strategy=partial", "shuffle.fraction=0.3", "model.dropout=0.1", "train.mixup_alpha=0.2",
]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict[str, str]]:
    """Reference: three epochs in one go (index mode; store mode trains identically, see above)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli(root, *RESUME, "name=whole")
    assert result.returncode == 0, result.stderr
    return rows(root / "whole" / "metrics" / "epochs.csv")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["index", "store"])
def test_an_interrupted_and_resumed_run_matches_an_uninterrupted_one(tmp_path, mode, uninterrupted):
    # 16 steps per epoch: stop at step 21, in the middle of epoch 1, then resume.
    first = run_cli(tmp_path, *RESUME, f"shuffle.mode={mode}", "name=parts", "train.max_steps=21")
    assert first.returncode == 0, first.stderr
    assert Checkpoints(tmp_path / "parts" / "checkpoints", 2).latest().name == "epoch-0001-step-0000005.pt"
    second = run_cli(tmp_path, *RESUME, f"shuffle.mode={mode}", "name=parts", "--resume")
    assert second.returncode == 0, second.stderr
    resumed = rows(tmp_path / "parts" / "metrics" / "epochs.csv")
    assert [r["epoch"] for r in resumed] == ["0", "1", "2"]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert [r[key] for r in resumed] == [r[key] for r in uninterrupted], key


IMPORTANCE = [
    "--nproc", "2", "train.deterministic=true", "train.epochs=4", "data.synthetic.num_samples=1024",
    "shuffle.strategy=importance", "shuffle.fraction=0", "shuffle.warmup_epochs=1",
    "shuffle.interval_epochs=2",
]  # fmt: skip


@pytest.mark.slow
def test_importance_repartitions_through_the_store_and_resumes_exactly(tmp_path):
    """Index mode in one go vs store mode stopped mid-epoch 1 and resumed: same orders and losses;
    the re-partitions (into epochs 1 and 3) move data through the exchanger and the store stays whole."""
    whole = run_cli(tmp_path, *IMPORTANCE, "name=whole")
    assert whole.returncode == 0, whole.stderr
    first = run_cli(tmp_path, *IMPORTANCE, "shuffle.mode=store", "name=parts", "train.max_steps=21")
    assert first.returncode == 0, first.stderr
    second = run_cli(tmp_path, *IMPORTANCE, "shuffle.mode=store", "name=parts", "--resume")
    assert second.returncode == 0, second.stderr
    for rank in (0, 1):
        a = rows(tmp_path / "whole" / "metrics" / f"rank-{rank}.csv")
        b = rows(tmp_path / "parts" / "metrics" / f"rank-{rank}.csv")
        assert [r["order_sha"] for r in a] == [r["order_sha"] for r in b]
        assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    epochs = rows(tmp_path / "parts" / "metrics" / "epochs.csv")
    moved = [int(r["bytes_exchanged"]) for r in epochs]
    assert moved[0] > 0 and moved[2] > 0 and moved[1] == moved[3] == 0  # into epochs 1 and 3 only
    verify = subprocess.run(
        [sys.executable, "-m", "reshuffle", "verify", str(tmp_path / "parts" / "store")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verify.returncode == 0, verify.stdout


@pytest.mark.slow
def test_a_dead_rank_ends_the_job_with_an_error(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "reshuffle", "run", str(CONFIGS / "smoke.yaml"), f"log.dir={tmp_path}",
         "name=dead", "--nproc", "2", "train.epochs=50", "dist.timeout_s=30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        log = tmp_path / "dead" / "logs" / "rank-1.log"
        deadline = time.monotonic() + 120
        while not (log.exists() and "epoch 0" in (tmp_path / "dead" / "logs" / "rank-0.log").read_text()):
            assert time.monotonic() < deadline and process.poll() is None, "training did not start"
            time.sleep(0.5)
        pid = int(log.read_text().split("pid ")[1].split()[0])
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)
        assert time.monotonic() - killed < 40
    finally:
        process.kill()
    assert process.returncode == 1
    assert "rank 1 failed (killed by SIGKILL); the other ranks were stopped" in stderr


SHIPPED = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "system.yaml")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_config_builds_and_trains_a_few_steps(tmp_path, path):
    """Each example's dataset, model and options work together (cut to a few steps, one rank)."""
    quick = ["train.max_steps=2", "train.epochs=1", "dist.nproc=1", "train.workers=0", "data.train_limit=512",
             "data.test_limit=128", "log.tensorboard=false", f"log.dir={tmp_path}"]  # fmt: skip
    config = load_run_config(path, quick)
    system = load_system_config(CONFIGS / "system.yaml")
    entry = dataset_entry(system, config.data.name)
    if entry.path and not Path(entry.path).expanduser().exists():  # not on this machine: a clear error
        assert config.data.name == "cifar10" or not os.environ.get("RESHUFFLE_REQUIRE_REAL_DATA")
        with pytest.raises(DataNotFoundError, match=r"not found in|looked"):
            train(config, system, tmp_path / config.name)
        return
    train(config, system, tmp_path / config.name)
    assert Checkpoints(tmp_path / config.name / "checkpoints", 2).paths()  # stopped at max_steps, resumable


@pytest.mark.parametrize(
    ("gpus", "local_world", "requested", "expected"),
    [(0, 1, "auto", "gloo"), (1, 1, "auto", "nccl"), (1, 4, "auto", "gloo"), (4, 4, "auto", "nccl"),
     (8, 4, "nccl", "nccl"), (0, 4, "gloo", "gloo")],
)  # fmt: skip
def test_backend_auto_takes_nccl_only_with_a_gpu_per_local_rank(
    monkeypatch, gpus, local_world, requested, expected
):
    import torch

    from reshuffle.train.distributed import choose_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert choose_backend(requested, local_world) == expected


def test_backend_nccl_without_enough_gpus_names_the_fix(monkeypatch):
    import torch

    from reshuffle.train.distributed import choose_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"runs 4 ranks and has 1 GPU.*at most 1 processes per node.*gloo"):
        choose_backend("nccl", 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match="none is available"):
        choose_backend("nccl", 1)


def test_env_json_records_the_system_config_that_was_given(tmp_path):
    """env.json names the --system file the run used (it named ./configs/system.yaml)."""
    system_file = tmp_path / "elsewhere" / "mine.yaml"
    system_file.parent.mkdir()
    system_file.write_text("backend: gloo\n")
    config = load_run_config(
        CONFIGS / "smoke.yaml", [*TINY, f"log.dir={tmp_path}", "name=env", "train.keep_freed_memory=off"]
    )
    train(config, load_system_config(system_file), tmp_path / "env")
    environment = json.loads((tmp_path / "env" / "env.json").read_text())
    assert environment["system_config"] == str(system_file.resolve())
    assert environment["freed_memory_kept"] is False  # train.keep_freed_memory=off


@pytest.mark.slow
def test_a_run_resumes_with_another_number_of_ranks_at_an_epoch_boundary(tmp_path):
    """Elastic resume through the CLI (index mode): 2 ranks for 2 epochs, then --nproc 3 for a third;
    in store mode a mid-epoch checkpoint refuses another number of ranks by name."""
    small = "data.synthetic.num_samples=512"
    first = run_cli(tmp_path, "--nproc", "2", "name=elastic", "train.epochs=2", small)
    assert first.returncode == 0, first.stderr[-2000:]
    more = run_cli(tmp_path, "--nproc", "3", "name=elastic", "train.epochs=3", small, "--resume")
    assert more.returncode == 0, more.stderr[-2000:]
    epochs = rows(tmp_path / "elastic" / "metrics" / "epochs.csv")
    assert [(r["epoch"], r["world_size"]) for r in epochs] == [("0", "2"), ("1", "2"), ("2", "3")]
    assert load_run_config(tmp_path / "elastic" / "config.yaml").dist.nproc == 3  # as run, not the config's
    store = ["name=midstore", "shuffle.mode=store", "train.epochs=2", small]
    assert run_cli(tmp_path, "--nproc", "2", *store, "train.max_steps=3").returncode == 0
    refused = run_cli(tmp_path, "--nproc", "3", *store, "--resume")
    assert refused.returncode == 2, refused.stderr[-2000:]  # a config error, found before any rank starts
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "reshuffle: error: --resume: the checkpoint was written mid-epoch (step 3) by 2 ranks and this "
            "job has 3; store mode changes the number of ranks only at an epoch boundary"
        )
    ), refused.stderr[-2000:]


@pytest.mark.slow
def test_a_run_resumes_mid_epoch_with_another_number_of_ranks(tmp_path):
    """Index mode, 2 ranks stopped after 3 of 8 steps of epoch 0; resumed with 3 ranks, stopped
    again inside the resized epoch, then finished: the rest of epoch 0 is dealt over the 3 ranks,
    so the epoch trains every sample once (512, padded to equal shares: at most 2 repeats), its
    totals include the steps before the resize, and epoch 1 is the 3-rank plan."""
    run = ["name=mid", "train.epochs=2", "data.synthetic.num_samples=512", "train.batch_size=32"]
    assert run_cli(tmp_path, "--nproc", "2", *run, "train.max_steps=3").returncode == 0
    # 3 ranks: 6 steps per epoch, the rest (320 samples, 107 each) takes 4: epoch 0 resumes at step 2
    again = run_cli(tmp_path, "--nproc", "3", *run, "train.max_steps=4", "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    done = run_cli(tmp_path, "--nproc", "3", *run, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    epochs = rows(tmp_path / "mid" / "metrics" / "epochs.csv")
    assert [(r["epoch"], r["world_size"]) for r in epochs] == [("0", "3"), ("1", "3")]
    assert 512 <= int(epochs[0]["samples"]) <= 514 and int(epochs[1]["samples"]) == 3 * 171
    logged = (tmp_path / "mid" / "logs" / "rank-0.log").read_text()
    assert "--resume with 3 ranks instead of 2 mid-epoch (step 3)" in logged


@pytest.mark.parametrize("command", ["run", "compare"])
def test_nproc_below_one_is_refused_before_anything_runs(tmp_path, command):
    from reshuffle.cli import main

    extra = ["--strategies", "global", "local"] if command == "compare" else []
    status = main([command, str(CONFIGS / "smoke.yaml"), "--nproc", "0", f"log.dir={tmp_path}", *extra])
    assert status == 2 and not any(tmp_path.iterdir())


@pytest.mark.slow
def test_store_mode_resumes_with_another_number_of_ranks_through_the_exchange(tmp_path):
    """Store mode, 2 ranks for 2 epochs, then 3 ranks for a third: the same store_dir is refused by
    name (it holds the old stores until the new ones are complete); a new one is filled from the
    2 old stores through the exchange (the log says so) and verifies clean."""
    small = ["data.synthetic.num_samples=512", "shuffle.mode=store", "name=grow"]
    first = run_cli(tmp_path, "--nproc", "2", "train.epochs=2", *small)
    assert first.returncode == 0, first.stderr[-2000:]
    same = run_cli(tmp_path, "--nproc", "3", "train.epochs=3", *small, "--resume")
    assert same.returncode == 1, same.stderr[-2000:]
    assert "with 3 ranks needs a new store_dir" in same.stderr
    new_store = f"shuffle.store_dir={tmp_path / 's3'}"
    fresh = run_cli(tmp_path, "--nproc", "3", "train.epochs=3", *small, new_store, "--resume")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    epochs = rows(tmp_path / "grow" / "metrics" / "epochs.csv")
    assert [(r["epoch"], r["world_size"]) for r in epochs] == [("0", "2"), ("1", "2"), ("2", "3")]
    logged = (tmp_path / "grow" / "logs" / "rank-0.log").read_text()
    assert "resized the stores of 2 ranks to 3" in logged, logged[-2000:]
    verify = subprocess.run([sys.executable, "-m", "reshuffle", "verify", str(tmp_path / "s3")],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert verify.returncode == 0, verify.stdout


def test_ranks_that_leave_the_gpus_idle_get_one_line_that_says_how_to_use_them():
    from reshuffle.train.distributed import idle_gpu_advice

    assert idle_gpu_advice(4, 0) is None and idle_gpu_advice(2, 2) is None
    advice = idle_gpu_advice(4, 1)
    assert "the ranks train on the CPU with gloo" in advice and "--nproc 1" in advice
    assert "--virtual-ranks 4" in advice and "\n" not in advice


def test_fewer_gpus_than_ranks_places_the_ranks_as_virtual_ranks_on_the_gpu(tmp_path, monkeypatch, capsys):
    """A local launch of 2 ranks on a machine with 1 GPU trains them as 2 virtual ranks in one
    process (on the GPU; here the CPU stands in, since the test suite has none) and says so;
    dist.place=processes, store mode or an explicit backend keep one process per rank."""
    from reshuffle.train import launch as launcher
    from reshuffle.train.distributed import virtual_placement

    assert virtual_placement("auto", 4, 0, "index", "auto") is None  # no GPU: processes
    assert virtual_placement("auto", 2, 2, "index", "auto") is None  # a GPU per rank: NCCL
    assert virtual_placement("auto", 4, 1, "store", "auto") is None  # virtual ranks read the dataset
    assert virtual_placement("auto", 4, 1, "index", "gloo") is None
    assert virtual_placement("processes", 4, 1, "index", "auto") is None
    assert "dist.place=virtual" in virtual_placement("virtual", 4, 0, "store", "auto")
    line = virtual_placement("auto", 4, 1, "index", "auto")
    assert "4 virtual ranks on the GPU" in line and "dist.place=processes" in line and "\n" not in line
    monkeypatch.setattr(launcher, "_gpus", lambda: 1)
    config = load_run_config(CONFIGS / "smoke.yaml", [*TINY, f"log.dir={tmp_path}", "name=placed"])
    assert launcher.launch(config, None, nproc=2) == 0
    assert "training them as 2 virtual ranks on the GPU" in capsys.readouterr().err
    epochs = rows(tmp_path / "placed" / "metrics" / "epochs.csv")
    assert epochs[-1]["virtual"] == "2" and epochs[-1]["world_size"] == "2"


def test_resume_takes_the_runs_saved_config_and_names_a_key_that_cannot_change(tmp_path, capsys):
    """`run CONFIG name=X --resume` continues X as it ran (its overrides need not be repeated);
    epochs may change; a strategy may not, and the error names the key."""
    from reshuffle.cli import main

    base = [str(CONFIGS / "smoke.yaml"), f"log.dir={tmp_path}", "name=again", *TINY[:-2]]
    assert (
        main(["run", *base, "--nproc", "1", "shuffle.strategy=local", "shuffle.fraction=0", "model.width=8"])
        == 0
    )
    assert main(["run", *base, "train.epochs=2", "--resume"]) == 0
    epochs = rows(tmp_path / "again" / "metrics" / "epochs.csv")
    assert [r["epoch"] for r in epochs] == ["0", "1"]
    assert load_run_config(tmp_path / "again" / "config.yaml").shuffle.strategy == "local"
    capsys.readouterr()
    assert main(["run", *base, "train.epochs=3", "shuffle.strategy=global", "--resume"]) == 2
    assert "shuffle.strategy cannot change on a resume" in capsys.readouterr().err


def test_epoch_totals_are_read_from_the_device_once_and_match_step_by_step_sums():
    """Losses and hits stay on the device until ``settle`` (to_numbers); the totals equal the sums
    a per-step read-back gives, and the step marks add up to the time breakdown."""
    from reshuffle.train.metrics import EpochStats

    stats = EpochStats(label_counts=[0] * 3)
    generator = torch.Generator().manual_seed(0)
    expected_loss, expected_hits, t = 0.0, 0, 0.0
    for _ in range(5):
        logits = torch.randn(8, 3, generator=generator)
        labels = torch.randint(0, 3, (8,), generator=generator)
        per_sample = torch.rand(8, generator=generator)
        expected_loss += float(per_sample.sum())
        expected_hits += int((logits.argmax(1) == labels).sum())
        stats.add_step((t, t + 0.1, t + 0.3, t + 0.6), per_sample, logits, labels, torch.arange(8))
        t += 1.0
    assert stats.loss_sum == 0.0 and stats.correct == 0  # nothing read back yet
    numbers = stats.to_numbers()
    assert numbers[:4] == [5, 40, pytest.approx(expected_loss), expected_hits]
    assert numbers[4:7] == [pytest.approx(0.5), pytest.approx(1.0), pytest.approx(1.5)]
    assert sum(stats.label_counts) == 40 and stats.to_numbers()[:4] == numbers[:4]  # settled once


def test_a_resident_training_set_trains_exactly_as_the_loader_and_resumes_exactly(tmp_path):
    """train.resident=on (the set decoded and normalised once, batches gathered on the device):
    the same ids, per-step losses and final weights as the DataLoader path; stopped mid-epoch and
    resumed, the same again. A random augmentation is refused by name."""
    common = ("train.epochs=2", "train.deterministic=true", "log.step_losses=true")
    loader = run_in_process(tmp_path, *common, "train.resident=off", name="loader")
    resident = run_in_process(tmp_path, *common, "train.resident=on", name="resident")
    run_in_process(tmp_path, *common, "train.resident=on", "train.max_steps=5", name="stopped")
    stopped = run_in_process(tmp_path, *common, "train.resident=on", name="stopped", resume=True)
    for other in (resident, stopped):
        assert [r["order_sha"] for r in rows(loader / "metrics" / "rank-0.csv")] == [
            r["order_sha"] for r in rows(other / "metrics" / "rank-0.csv")
        ]
        losses = [r["loss"] for r in rows(other / "metrics" / "steps.csv")]  # a resume: from step 5 on
        assert [r["loss"] for r in rows(loader / "metrics" / "steps.csv")][-len(losses) :] == losses
        a = Checkpoints.load(Checkpoints(loader / "checkpoints", 2).latest())["model"]
        b = Checkpoints.load(Checkpoints(other / "checkpoints", 2).latest())["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), other
    system = tmp_path / "system.yaml"
    system.write_text(
        "datasets:\n  synthetic:\n    loader: synthetic\n    train_transforms: [horizontal-flip, normalize]\n"
    )
    config = load_run_config(
        CONFIGS / "smoke.yaml", [*TINY, f"log.dir={tmp_path}", "name=flip", "train.resident=on"]
    )
    with pytest.raises(ConfigError, match="no random augmentation in the train transforms"):
        train(config, load_system_config(system), tmp_path / "flip")


def _count_reductions(rank, world, grad_sync):
    from reshuffle.config import load_run_config
    from reshuffle.train import step

    config = load_run_config(CONFIGS / "smoke.yaml", [f"train.grad_sync={grad_sync}"])
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    calls = []

    def hook(_, bucket):
        calls.append(bucket.index())
        return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])

    ddp.register_comm_hook(None, hook)
    for _ in range(2):
        with step.gradient_sync(ddp, config):
            ddp(torch.randn(3, 4)).sum().backward()
        ddp.zero_grad()
    return len(calls)


def test_explicit_gradient_sync_leaves_the_reduction_to_the_caller(tmp_path):
    """train.grad_sync=explicit: DDP reduces nothing in backward (the loop reduces once after);
    the forward used to run outside no_sync, so every step reduced twice."""
    assert run_ranks(_count_reductions, 2, "explicit") == [0, 0]
    assert run_ranks(_count_reductions, 2, "overlapped") == [2, 2]
