"""What a run writes: metrics files first (CSV), TensorBoard and W&B from the same rows.

``metrics/epochs.csv`` has one row per epoch aggregated over ranks; ``metrics/rank-<r>.csv`` one
row per epoch per rank. Reports read only these files. Rank 0 writes everything (it gathers the
per-rank rows), so a run directory on one node's disk is complete.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Contract columns first (reports and outside scripts rely on them), then the rest.
EPOCH_COLUMNS = [
    "epoch",
    "train_loss",
    "test_acc",
    "epoch_s",
    "io_s",
    "exchange_s",
    "exchange_exposed_s",
    "fw_bw_s",
    "ge_wu_s",
    "bytes_exchanged",
    "samples_moved",
    "bytes_planned",
    "bytes_across_nodes",
    "train_acc",
    "test_loss",
    "test_top5",
    "lr",
    "samples_per_s",
    "steps",
    "samples",
    "io_max_s",
    "exchange_exposed_max_s",
    "eval_s",
    "label_js",
    "label_js_max",
    "churn",
    "coverage",
    "storage_bytes",
    "world_size",
    "virtual",
]
STEP_COLUMNS = ["epoch", "step", "loss"]
RANK_COLUMNS = [
    "epoch",
    "rank",
    "steps",
    "samples",
    "train_loss",
    "train_acc",
    "io_s",
    "fw_bw_s",
    "ge_wu_s",
    "exchange_s",
    "exchange_exposed_s",
    "bytes_sent",
    "bytes_received",
    "label_js",
    "order_sha",
]


class MetricsFiles:
    """Appends epoch rows to the CSV files (and TensorBoard / W&B when enabled)."""

    def __init__(self, run_dir: Path, *, resume_epoch: int, tensorboard: bool, wandb: Any = None) -> None:
        self.directory = run_dir / "metrics"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.epochs = self.directory / "epochs.csv"
        self.ranks = self.directory / "rank-{rank}.csv"
        for path in [self.epochs, self.directory / "steps.csv", *self.directory.glob("rank-*.csv")]:
            _truncate(path, before_epoch=resume_epoch)  # rows a crash left after the checkpoint
        self.tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        self.wandb = wandb

    def write(
        self, row: dict[str, Any], rank_rows: list[dict[str, Any]], step_rows: Sequence[dict[str, Any]] = ()
    ) -> None:
        _append(self.epochs, EPOCH_COLUMNS, row)
        for step_row in step_rows:  # log.step_losses
            _append(self.directory / "steps.csv", STEP_COLUMNS, step_row)
        for rank_row in rank_rows:
            _append(Path(str(self.ranks).format(rank=rank_row["rank"])), RANK_COLUMNS, rank_row)
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "epoch"}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                if not (isinstance(value, float) and math.isnan(value)):
                    self.tensorboard.add_scalar(key, value, row["epoch"])
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=int(row["epoch"]))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _append(path: Path, columns: list[str], row: dict[str, Any]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({key: _format(row.get(key)) for key in columns})


def _format(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""  # empty: not measured in this kind of run (see docs)
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def _truncate(path: Path, before_epoch: int) -> None:
    if not path.exists():
        return
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    kept = [r for r in body if r and int(r[header.index("epoch")]) < before_epoch]
    if len(kept) != len(body):
        with open(path, "w", newline="") as handle:
            csv.writer(handle).writerows([header, *kept])


def start_wandb(mode: str, project: str, name: str, run_dir: Path, config: dict[str, Any]) -> Any:
    """A W&B run (``online`` or ``offline``; offline runs sync later with ``wandb sync``)."""
    try:
        import wandb
    except ImportError as error:
        raise ImportError(
            "log.wandb needs the wandb package: pip install wandb (or reshuffle[wandb])"
        ) from error
    if mode == "online":
        return wandb.init(
            project=project, name=name, dir=str(run_dir), mode="online", config=config, reinit=True
        )
    if mode == "offline":
        return wandb.init(
            project=project, name=name, dir=str(run_dir), mode="offline", config=config, reinit=True
        )
    raise ValueError(f"log.wandb must be online or offline, got {mode!r}")
