"""Epoch metrics: one rank's running totals, the plan's footprint, and the rows written to CSV.

Both trainers build rows here: the real one from every rank's gathered totals, virtual ranks
from the totals of the ranks it simulates (the columns one process cannot measure are NaN, and
are written empty).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from reshuffle.data.source import SampleSource
from reshuffle.plan import EpochPlan, ShufflePlanner

# What each rank reports per epoch (gathered as one float64 tensor; order matters).
FIELDS = [
    "steps", "samples", "loss_sum", "correct", "io_s", "fw_bw_s", "ge_wu_s",
    "exchange_s", "exchange_exposed_s", "bytes_sent", "bytes_received", "label_js",
    "order_hash", "epoch_s", "train_s", "moved", "moved_across", "churn", "coverage", "storage",
]  # fmt: skip


@dataclasses.dataclass
class EpochStats:
    """One rank's running totals for an epoch (saved in mid-epoch checkpoints)."""

    steps: int = 0
    samples: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    io_s: float = 0.0
    fw_bw_s: float = 0.0
    ge_wu_s: float = 0.0
    order_hash: int = 0  # rolling hash of the ids trained on, in order (52 bits: exact in float64)
    label_counts: list[int] = dataclasses.field(default_factory=list)

    # what the device still holds: loss and hit sums, and the step marks (CUDA events) not yet read
    _on_device: list[torch.Tensor] = dataclasses.field(default_factory=list, repr=False, compare=False)
    _marks: list[tuple[Any, ...]] = dataclasses.field(default_factory=list, repr=False, compare=False)

    def add_step(
        self, marks: tuple[Any, Any, Any, Any], per_sample: torch.Tensor, logits: torch.Tensor,
        labels: torch.Tensor, ids: torch.Tensor,
    ) -> None:  # fmt: skip
        """One step: its marks (start, loaded, computed, updated: from ``mark``), losses and hits
        (kept on the device, read once in ``settle``), and the labels and ids the loader gave
        (host tensors: counted here without waiting for the device)."""
        self._marks.append(marks)
        self.steps += 1
        self.samples += labels.shape[0]
        sums = torch.stack([per_sample.detach().float().sum(), (logits.detach().argmax(1) == labels.to(
            logits.device, non_blocking=True)).sum().float()])  # fmt: skip
        if self._on_device:
            self._on_device[0] += sums
        else:
            self._on_device.append(sums.double())
        counts = torch.bincount(labels.cpu(), minlength=len(self.label_counts))
        self.label_counts = [a + int(b) for a, b in zip(self.label_counts, counts, strict=True)]
        self.order_hash = order_hash(ids.tolist(), self.order_hash)

    def settle(self) -> None:
        """Fold what the device holds into the totals: one wait for the device, not one per step."""
        if self._marks and not isinstance(self._marks[-1][-1], float):
            self._marks[-1][-1].synchronize()  # CUDA events: elapsed times are known once the last is
        for start, loaded, computed, updated in self._marks:
            self.io_s += seconds_between(start, loaded)
            self.fw_bw_s += seconds_between(loaded, computed)
            self.ge_wu_s += seconds_between(computed, updated)
        self._marks.clear()
        if self._on_device:
            loss_sum, correct = self._on_device.pop().tolist()
            self.loss_sum += loss_sum
            self.correct += round(correct)

    def to_numbers(self) -> list[float]:
        """Every field as exact float64 values, for a tensor all-gather."""
        self.settle()
        head = [self.steps, self.samples, self.loss_sum, self.correct, self.io_s, self.fw_bw_s, self.ge_wu_s]
        return [float(v) for v in [*head, self.order_hash]] + [float(c) for c in self.label_counts]

    @classmethod
    def from_numbers(cls, values: list[float]) -> EpochStats:
        steps, samples, loss_sum, correct, io_s, fw_bw_s, ge_wu_s, hashed, *labels = values
        return cls(
            int(steps), int(samples), loss_sum, int(correct), io_s, fw_bw_s, ge_wu_s, int(hashed),
            [int(c) for c in labels],
        )  # fmt: skip


def mark(device: torch.device) -> Any:
    """A point in a step's time line: ``time.perf_counter()`` on the CPU; on CUDA an event recorded
    in the current stream, so that marking never makes the host wait for the GPU."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def seconds_between(start: Any, end: Any) -> float:
    """Seconds between two ``mark`` s: the host's clock, or the GPU's time line between events."""
    return end - start if isinstance(start, float) else start.elapsed_time(end) / 1000


def order_hash(ids: list[int], value: int = 0) -> int:
    """Rolling hash of sample ids in order (52 bits, so float64 carries it exactly)."""
    for sample in ids:
        value = ((value * 1_000_003) ^ sample) & 0x000F_FFFF_FFFF_FFFF
    return value


class Footprint:
    """Per rank and epoch, from the plans: churn (share of the rank's holdings new this epoch),
    coverage (share of the dataset it has trained on so far) and peak storage in samples
    (holdings plus the samples arriving for the next epoch: what a store-mode rank keeps)."""

    def __init__(self, planner: ShufflePlanner, start_epoch: int, ranks: list[int]) -> None:
        self.seen = {rank: np.zeros(planner.num_samples, dtype=bool) for rank in ranks}
        self.previous: dict[int, np.ndarray | None] = dict.fromkeys(ranks)
        self.known = True
        try:  # a resumed run replays the plans before it (a loss-driven plan may not have them)
            for epoch in range(start_epoch):
                plan = planner.plan(epoch)
                for rank in ranks:
                    self.seen[rank][plan.indices(rank)] = True
                    self.previous[rank] = plan.holdings(rank) if epoch + 1 == start_epoch else None
        except ValueError:
            self.known = False

    def update(self, plan: EpochPlan, rank: int, last_epoch: bool) -> tuple[float, float, float]:
        held = plan.holdings(rank)
        self.seen[rank][plan.indices(rank)] = True
        coverage = float(self.seen[rank].mean()) if self.known else math.nan
        before, self.previous[rank] = self.previous[rank], held
        churn = np.setdiff1d(held, before).size / held.size if before is not None else math.nan
        arriving = 0 if last_epoch else sum(ids.size for ids in plan.receives(rank).values())
        return churn, coverage, float(held.size + arriving)


def moved(plan: EpochPlan, rank: int, last_epoch: bool, per_node: int) -> tuple[int, int]:
    """Samples ``rank`` sends after ``plan``'s epoch (none after the last): in all, and to ranks of
    other nodes (nodes of ``per_node`` consecutive ranks)."""
    sends = {} if last_epoch else plan.sends(rank)
    across = sum(ids.size for dst, ids in sends.items() if dst // per_node != rank // per_node)
    return sum(ids.size for ids in sends.values()), across


def gather_numbers(values: list[float], device: torch.device, world_size: int) -> list[list[float]]:
    """Every rank's ``values`` (equally long on every rank; a float64 all-gather, no pickling)."""
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(everyone, mine)
    return [tensor.tolist() for tensor in everyone]


def gather(values: list[float], device: torch.device, world_size: int) -> list[dict[str, float]]:
    """Every rank's :data:`FIELDS` values."""
    return [dict(zip(FIELDS, row, strict=True)) for row in gather_numbers(values, device, world_size)]


def nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def epoch_row(
    epoch: int, ranks: list[dict[str, float]], test: dict[str, float], eval_s: float, lr: float,
    sample_bytes: float, *, virtual: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """The ``epochs.csv`` row of ``epoch`` from every rank's :data:`FIELDS`."""
    samples = sum(r["samples"] for r in ranks)
    train_s = max(r["train_s"] for r in ranks)
    return {
        "epoch": epoch,
        "train_loss": sum(r["loss_sum"] for r in ranks) / samples,
        "train_acc": sum(r["correct"] for r in ranks) / samples,
        **test,
        "epoch_s": max(r["epoch_s"] for r in ranks),
        "io_s": nanmean([r["io_s"] for r in ranks]),
        "io_max_s": max(r["io_s"] for r in ranks),
        "fw_bw_s": nanmean([r["fw_bw_s"] for r in ranks]),
        "ge_wu_s": nanmean([r["ge_wu_s"] for r in ranks]),
        "exchange_s": nanmean([r["exchange_s"] for r in ranks]),
        "exchange_exposed_s": nanmean([r["exchange_exposed_s"] for r in ranks]),
        "exchange_exposed_max_s": max(r["exchange_exposed_s"] for r in ranks),
        "bytes_exchanged": int(sum(r["bytes_sent"] for r in ranks)),
        "samples_moved": int(sum(r["moved"] for r in ranks)),
        "bytes_planned": int(sum(r["moved"] for r in ranks) * sample_bytes),
        "bytes_across_nodes": int(sum(r["moved_across"] for r in ranks) * sample_bytes),
        "lr": lr,
        "samples_per_s": samples / train_s if train_s else math.nan,
        "steps": int(ranks[0]["steps"]),
        "samples": int(samples),
        "eval_s": eval_s,
        "label_js": nanmean([r["label_js"] for r in ranks]),
        "label_js_max": max(r["label_js"] for r in ranks),
        "churn": nanmean([r["churn"] for r in ranks]),
        "coverage": nanmean([r["coverage"] for r in ranks]),
        "storage_bytes": int(max(r["storage"] for r in ranks) * sample_bytes),
        "world_size": len(ranks),
        "virtual": virtual,
    }


def rank_rows(epoch: int, ranks: list[dict[str, float]]) -> list[dict[str, Any]]:
    """The ``rank-<r>.csv`` rows of ``epoch``."""
    return [
        {
            "epoch": epoch,
            "rank": rank,
            "steps": int(r["steps"]),
            "samples": int(r["samples"]),
            "train_loss": r["loss_sum"] / max(r["samples"], 1),
            "train_acc": r["correct"] / max(r["samples"], 1),
            "io_s": r["io_s"],
            "fw_bw_s": r["fw_bw_s"],
            "ge_wu_s": r["ge_wu_s"],
            "exchange_s": r["exchange_s"],
            "exchange_exposed_s": r["exchange_exposed_s"],
            "bytes_sent": int(r["bytes_sent"]),
            "bytes_received": int(r["bytes_received"]),
            "label_js": r["label_js"],
            "order_sha": f"{int(r['order_hash']):013x}",
        }
        for rank, r in enumerate(ranks)
    ]


def epoch_line(row: dict[str, Any]) -> str:
    exposed = row["exchange_exposed_s"]
    timing = (
        f"io {row['io_s']:.2f}, fw+bw {row['fw_bw_s']:.2f}, ge+wu {row['ge_wu_s']:.2f}, "
        f"exposed exchange {'-' if math.isnan(exposed) else f'{exposed:.2f}'}"
    )
    if row["virtual"]:
        timing = f"{row['virtual']} virtual ranks"
    return (
        f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}, "
        f"test acc {row['test_acc']:.4f}, {row['epoch_s']:.1f} s ({timing})"
    )


def mean_sample_bytes(source: SampleSource) -> float:
    """Bytes per stored sample: exact for in-memory datasets, a 64-sample mean for files."""
    fixed = getattr(source, "sample_bytes", None)
    if fixed is not None:
        return float(fixed)
    picks = np.random.default_rng(0).choice(len(source), size=min(64, len(source)), replace=False)
    return float(np.mean([len(source.raw(int(i))) for i in picks]))
