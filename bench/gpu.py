"""The trainer against a minimal loop: ``reshuffle run`` at the speed of 30 lines of PyTorch?

The minimal loop is what a user writes by hand: the training images resident on the device
(normalised once), a ``randperm`` per epoch, index a batch, forward, backward, step; no metrics,
no time breakdown. ``reshuffle run`` trains the same model (small CNN, width 16, BatchNorm) on the
same data with the same batch and optimiser (SGD Nesterov, momentum 0.9, weight decay 5e-4), one
rank, global shuffling in index mode, and reports its time breakdown as usual. Both run in this
job, interleaved, ``--repeats`` times, each in a fresh process (the loop too, so that both start
alike); each figure is the median over repeats of samples/s over
the epochs after the first (epoch 0 warms up: allocator, cuDNN autotuning). Rows: every batch
size x recipe (fp32; bf16 autocast + channels_last, on a CPU too, where it is slower than fp32
unless the CPU has bf16 units: the ratio is what the rows compare; with ``--compile`` both
under ``torch.compile`` instead, in a table of its own: the loop compiles its model, the run sets
``train.compile=true``; compiling happens in epoch 0, which is not timed).
The target (issue 20) is ratio >= 0.9 in every row.

Data: Fashion-MNIST when installed (``--train-samples`` of it), synthetic of the same shape
otherwise. Run: ``.venv/bin/python bench/gpu.py [--batches 256 1024] [--epochs 3] [--repeats 2]
[--compile]``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, write_results
from reshuffle import keep_freed_memory

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST's, as in configs/system.yaml


def load_images(train_samples: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """uint8 images (N, 1, 28, 28), int64 labels, and the overrides that give ``reshuffle run``
    the same data."""
    if FMNIST.exists():
        from reshuffle.data.fashion_mnist import load_fashion_mnist

        source = load_fashion_mnist("train", path=str(FMNIST.parent))
        data = ["data.name=fashion-mnist", f"data.train_limit={train_samples}"]
    else:
        from reshuffle.data.synthetic import load_synthetic

        source = load_synthetic("train", num_samples=train_samples)
        data = ["data.name=synthetic", f"data.synthetic.num_samples={train_samples}"]
    images = torch.from_numpy(source.images[:train_samples]).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(source.targets[:train_samples]).long(), data


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a row trains: fp32 or bf16 autocast + channels_last; eager or ``torch.compile``."""

    bf16: bool = False
    compiled: bool = False

    @property
    def label(self) -> str:
        return ("bf16 + channels_last" if self.bf16 else "fp32") + (" + compile" if self.compiled else "")

    def overrides(self) -> list[str]:
        """The same recipe as ``reshuffle run`` overrides."""
        return [
            f"train.amp={'bf16' if self.bf16 else 'off'}", f"train.channels_last={str(self.bf16).lower()}",
            f"train.compile={str(self.compiled).lower()}",
        ]  # fmt: skip


def minimal_loop(
    images: torch.Tensor, labels: torch.Tensor, batch: int, recipe: Recipe, epochs: int, device: torch.device
) -> float:
    """Samples/s of the hand-written loop over epochs 1.. (the loop a user would write)."""
    from reshuffle.config.schema import ModelConfig
    from reshuffle.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="small-cnn", norm="batch", width=16), (1, 28, 28), 10).to(device)
    x = ((images.to(device).float() / 255 - MEAN) / STD).contiguous()
    y = labels.to(device)
    bf16 = recipe.bf16
    if bf16:
        model, x = (
            model.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1 * batch / 256, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)  # fmt: skip
    criterion = nn.CrossEntropyLoss()
    forward = torch.compile(model) if recipe.compiled else model
    rates = []
    for _ in range(epochs):
        _sync(device)
        started = time.perf_counter()
        order = torch.randperm(len(x), device=device)
        for at in range(0, len(x), batch):
            index = order[at : at + batch]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = criterion(forward(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        _sync(device)
        rates.append(len(x) / (time.perf_counter() - started))
    return statistics.fmean(rates[1:] or rates)


def loop_process(train_samples: int, batch: int, recipe: Recipe, epochs: int, kept: bool = False) -> float:
    """:func:`minimal_loop` in a fresh process, as ``reshuffle run`` runs: the same start (imports,
    allocator, threads) for both sides of a ratio; ``kept``: inside ``reshuffle.keep_freed_memory``
    (what ``reshuffle run`` does on a CPU), so that the trainer's own overhead shows apart from it."""
    arguments = (train_samples, batch, int(recipe.bf16), int(recipe.compiled), epochs, int(kept))
    command = [sys.executable, __file__, "--loop", *map(str, arguments)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"minimal loop failed:\n{result.stderr[-3000:]}")
    return float(result.stdout.strip().splitlines()[-1])


def reshuffle_run(
    tmp: Path, name: str, data: list[str], batch: int, recipe: Recipe, epochs: int, resident: str = "auto"
) -> dict:
    """Samples/s of ``reshuffle run`` (epochs 1..) and its time breakdown per epoch."""
    command = [
        sys.executable, "-m", "reshuffle", "run", str(ROOT / "configs" / "fashion-mnist.yaml"),
        "--nproc", "1",
        f"name={name}", f"log.dir={tmp}", f"train.epochs={epochs}", f"train.batch_size={batch}",
        "train.reference_batch=256", "shuffle.strategy=global", "shuffle.fraction=0", "log.tensorboard=false",
        "log.every_steps=0", "log.progress=lines", "train.checkpoint_every=0", "train.warmup_epochs=0",
        *recipe.overrides(), f"train.resident={resident}", *data,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800, env={**os.environ})
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    with open(tmp / name / "metrics" / "epochs.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))[1:]
    mean = lambda key: statistics.fmean(float(row[key]) for row in rows)  # noqa: E731
    return {"samples_per_s": mean("samples_per_s"), **{k: mean(k) for k in ("io_s", "fw_bw_s", "ge_wu_s")}}


def measure_row(
    tmp: Path, args: argparse.Namespace, data: list[str], batch: int, recipe: Recipe, device: torch.device
) -> tuple[dict, dict]:
    """One row: ``args.repeats`` rounds of the minimal loop (and on a CPU the loop with freed memory
    kept), ``reshuffle run`` and ``reshuffle run`` with ``train.resident=on``, interleaved."""
    loops, kept_loops, runs, residents = [], [], [], []
    for repeat in range(args.repeats):
        loops.append(loop_process(args.train_samples, batch, recipe, args.epochs))
        if device.type == "cpu":  # where reshuffle run keeps freed memory (train.keep_freed_memory)
            kept_loops.append(loop_process(args.train_samples, batch, recipe, args.epochs, kept=True))
        name = f"{batch}-{int(recipe.bf16)}{int(recipe.compiled)}-{repeat}"
        runs.append(reshuffle_run(tmp, f"b{name}", data, batch, recipe, args.epochs))
        residents.append(reshuffle_run(tmp, f"r{name}", data, batch, recipe, args.epochs, "on"))
    ratios = [r["samples_per_s"] / loop for r, loop in zip(runs, loops, strict=True)]
    kept_ratios = [r["samples_per_s"] / loop for r, loop in zip(runs, kept_loops, strict=False)]
    row = {
        "batch": batch, "recipe": recipe.label,
        "loop samples/s": statistics.median(loops),
        "run samples/s": statistics.median(r["samples_per_s"] for r in runs),
        "ratio": statistics.median(ratios),
        "resident ratio": statistics.median(
            r["samples_per_s"] / loop for r, loop in zip(residents, loops, strict=True)
        ),
        "ratio min-max": f"{min(ratios):.2f}-{max(ratios):.2f}",
        "ratio to loop, memory kept": statistics.median(kept_ratios) if kept_ratios else "-",
        "loop spread": f"{(max(loops) - min(loops)) / statistics.median(loops):.0%}",
        **{f"run {k} per epoch": statistics.median(r[k] for r in runs)
           for k in ("io_s", "fw_bw_s", "ge_wu_s")},
    }  # fmt: skip
    repeat = {"batch": batch, "recipe": recipe.label, "loops": loops, "kept_loops": kept_loops, "runs": runs,
              "ratios": ratios, "residents": residents}  # fmt: skip
    return row, repeat


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    if sys.argv[1:2] == ["--loop"]:  # one minimal loop, for loop_process
        samples, batch, bf16, compiled, epochs, kept = map(int, sys.argv[2:8])
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        images, labels, _ = load_images(samples)
        with keep_freed_memory(bool(kept)):
            print(minimal_loop(images, labels, batch, Recipe(bool(bf16), bool(compiled)), epochs, device))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train-samples", type=int, default=60_000)
    parser.add_argument("--compile", action="store_true", help="the recipes under torch.compile (own table)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, _, data = load_images(args.train_samples)
    # fp32, and bf16 autocast + channels_last (on a CPU without bf16 units: slow); compiled if asked
    recipes = [Recipe(bf16, args.compile) for bf16 in (False, True)]
    rows, repeats = [], []  # repeats: every repeat's figures, kept in the JSON
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batches:
            for recipe in recipes:
                row, repeat = measure_row(Path(tmp), args, data, batch, recipe, device)
                rows.append(row)
                repeats.append(repeat)
                print(row, repeat, flush=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    headers = list(rows[0])
    table = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    table += ["| " + " | ".join(_cell(row[h]) for h in headers) + " |" for row in rows]
    markdown = "\n".join([
        f"## The trainer vs a minimal loop (`bench/gpu.py{' --compile' * args.compile}`), on {device.type}",
        "",
        f"Machine: {where}; {machine()}. {args.train_samples} training samples, {args.epochs} epochs "
        f"(epochs 1.. timed), {args.repeats} repeats interleaved, the loop and every run each in a fresh "
        "process; ratio = `reshuffle run` samples/s / the minimal loop's, median over repeats (min-max); "
        "*resident ratio*: the same with `train.resident=on` "
        "(the set decoded on the device, batches gathered there; `auto` turns it on on a GPU). "
        "*ratio to loop, memory kept* (CPU): against the same minimal loop run inside "
        "`reshuffle.keep_freed_memory()`, as `reshuffle run` trains on a CPU by default "
        "(`train.keep_freed_memory=auto`): the trainer's own cost, apart from the allocator's. "
        "*loop spread*: how much the minimal loop alone varies between repeats ((max - min) / median): the "
        "machine's noise, against which a ratio's min-max must be read. The run's time-breakdown columns are "
        "seconds per epoch (default settings).",
        "", *table,
    ])  # fmt: skip
    write_results(
        f"gpu-{device.type}{'-compile' * args.compile}",
        {"device": where, "rows": rows, "repeats": repeats},
        markdown,
    )


def _cell(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
