"""The runs a report compares: read from their folders, labelled, grouped over seeds, summarised.

A report reads only what runs write: ``config.yaml`` (to name each run's strategy and seed) and
``metrics/epochs.csv``. Runs that differ only in ``seed`` form one group; each plot shows the
group's mean over seeds with a band from its lowest to its highest seed. Labels name the settings
that differ between groups (strategy first), e.g. ``partial 0.1`` or ``local, norm=group``.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reshuffle.config.loading import load_yaml_text
from reshuffle.errors import ReshuffleError
from reshuffle.plan.strategies import STRATEGIES

NEEDED = ("epoch", "train_loss", "test_acc", "epoch_s")
# settings that do not change what a run learns (where and how it logs, checkpoints, loads)
IGNORED = {
    "seed", "name", "log", "dist.timeout_s", "dist.virtual_batch_limit", "dist.place", "train.max_steps",
    "train.workers", "train.pin_memory", "train.deterministic", "train.checkpoint_every",
    "train.checkpoint_steps", "train.keep_checkpoints", "data.test_limit", "shuffle.store_dir",
    "shuffle.exchange_chunk_mb",
}  # fmt: skip


# settings that matter only where another one has a value: (that key, the values where it applies)
def _strategies_using(option: str) -> set[Any]:
    """The strategies whose plans read ``option`` (from the registry: no list to keep in step)."""
    return {
        name
        for name, strategy in STRATEGIES.items()
        if (strategy.uses_fraction if option == "fraction" else option in strategy.option_defaults)
    }


# settings that matter only where another one has a value: (that key, the values where it applies)
APPLIES: dict[str, tuple[str, set[Any]]] = {
    "data.synthetic": ("data.name", {"synthetic"}),
    "shuffle.fraction": ("shuffle.strategy", _strategies_using("fraction")),
    **{
        f"shuffle.{option}": ("shuffle.strategy", _strategies_using(option))
        for option in sorted({o for s in STRATEGIES.values() for o in s.option_defaults})
    },
    "dist.nproc": ("dist.virtual_ranks", {0, None}),
}
SHORT = {
    "shuffle.strategy": "",
    "shuffle.fraction": "",
    "shuffle.partition": "partition",
    "shuffle.select": "select",
    "model.norm": "norm",
    "train.bn_recalibrate": "recalibrate",
    "dist.virtual_ranks": "virtual",
    "dist.nproc": "ranks",
    "shuffle.mode": "mode",
    "data.name": "data",
}


class ReportError(ReshuffleError):
    """A run folder the report cannot use; the message names the file and what is wrong."""


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # flattened: "shuffle.strategy" -> value
    epochs: list[dict[str, float]]

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))


def load_run(path: Path) -> Run:
    """A run folder's config and epoch metrics, or a ReportError naming what is missing or bad."""
    path = Path(path)
    config_path, metrics_path = path / "config.yaml", path / "metrics" / "epochs.csv"
    for needed in (config_path, metrics_path):
        if not needed.is_file():
            raise ReportError(f"{needed} is missing: is {path} a finished `reshuffle run` folder?")
    try:
        config = _flatten(load_yaml_text(config_path.read_text()))
    except Exception as error:
        raise ReportError(f"{config_path} cannot be read ({error})") from None
    with open(metrics_path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in NEEDED if c not in (reader.fieldnames or [])]
        if missing:
            raise ReportError(
                f"{metrics_path} lacks the column(s) {', '.join(missing)}: not a reshuffle metrics file"
            )
        epochs = []
        for line, row in enumerate(reader, start=2):
            try:
                epochs.append({k: float(v) if v not in ("", None) else math.nan for k, v in row.items() if k})
            except ValueError as error:
                raise ReportError(f"{metrics_path} line {line}: {error}") from None
    if not epochs:
        raise ReportError(f"{metrics_path} has no epochs yet: let the run finish at least one")
    return Run(path, config, epochs)


def _flatten(mapping: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(mapping, dict):
        raise ValueError("not a mapping")
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value and key != "optimizer_kwargs":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _applies(key: str, config: dict[str, Any]) -> bool:
    for prefix, (other, values) in APPLIES.items():
        if key == prefix or key.startswith(f"{prefix}."):
            return config.get(other) in values
    return True


def _varying(runs: Sequence[Run]) -> list[str]:
    """The settings that differ between ``runs`` and change what a run learns (seed aside; a
    setting counts only for the runs it applies to, e.g. ``data.synthetic.*`` where ``data.name``
    is synthetic), the named ones (``SHORT``) first."""
    keys = sorted({k for run in runs for k in run.config})
    varying = [
        k
        for k in keys
        if not any(k == i or k.startswith(f"{i}.") for i in IGNORED)
        and len({repr(run.config.get(k)) for run in runs if _applies(k, run.config)}) > 1
    ]
    return [k for k in SHORT if k in varying] + [k for k in varying if k not in SHORT]


def experiment_of(run: Run) -> str:
    """The experiment a run belongs to: a compare's name (``<name>/runs/<run>``), else its folder."""
    return run.path.parent.parent.name if run.path.parent.name == "runs" else run.path.name


def label_runs(runs: Sequence[Run], most: int = 4) -> list[str]:
    """A short label per run: its strategy, then each setting of ``_varying`` by its last name
    where unique. Where more than ``most`` settings differ (runs of different experiments), the
    experiment's name stands for them, followed by what differs within it; ``differences`` lists
    the rest for the report."""
    order = _varying(runs)
    if len([k for k in order if k not in ("shuffle.strategy", "shuffle.fraction")]) <= most:
        return [_label(run, order) for run in runs]
    by_experiment: dict[str, list[Run]] = {}
    for run in runs:
        by_experiment.setdefault(experiment_of(run), []).append(run)
    labels = {}
    for name, members in by_experiment.items():
        within = _varying(members)
        for run in members:
            strategy, *rest = _label(run, within).split(", ")
            labels[id(run)] = ", ".join([strategy, name, *rest])
    return [labels[id(run)] for run in runs]


def differences(runs: Sequence[Run]) -> list[str]:
    """Per experiment, its settings where the experiments differ: for a report over several."""
    by_experiment: dict[str, Run] = {}
    for run in runs:
        by_experiment.setdefault(experiment_of(run), run)
    if len(by_experiment) < 2:
        return []
    order = [k for k in _varying(list(by_experiment.values())) if k != "shuffle.strategy"]
    return [
        f"- `{name}`: "
        + ", ".join(f"{k}={_short_value(run.config.get(k))}" for k in order if _applies(k, run.config))
        for name, run in by_experiment.items()
    ]


def _label(run: Run, order: Sequence[str]) -> str:
    last = [k.rsplit(".", 1)[-1] for k in order]
    strategy = str(run.config.get("shuffle.strategy", "?"))
    if run.config.get("shuffle.strategy") == "partial":
        strategy += f" {run.config.get('shuffle.fraction')}"
    parts = [strategy]
    for key, name in zip(order, last, strict=True):
        if key in ("shuffle.strategy", "shuffle.fraction") or not _applies(key, run.config):
            continue
        value = run.config.get(key)
        if key == "dist.virtual_ranks" and not value:
            continue  # such a run's ranks come from dist.nproc
        parts.append(f"{SHORT.get(key, name if last.count(name) == 1 else key)}={_short_value(value)}")
    return ", ".join(parts)


def _short_value(value: Any) -> str:
    if isinstance(value, list):
        return "x".join(map(str, value))
    return str(value)


@dataclass
class Group:
    label: str
    runs: list[Run]

    def series(self, column: str) -> tuple[list[int], list[float], list[float], list[float]]:
        """Epochs, and per epoch the mean, min and max over seeds of ``column`` (NaN skipped)."""
        epochs = sorted({int(row["epoch"]) for run in self.runs for row in run.epochs})
        means, lows, highs = [], [], []
        for epoch in epochs:
            values = [
                row.get(column, math.nan)
                for run in self.runs
                for row in run.epochs
                if int(row["epoch"]) == epoch and not math.isnan(row.get(column, math.nan))
            ]
            means.append(statistics.fmean(values) if values else math.nan)
            lows.append(min(values) if values else math.nan)
            highs.append(max(values) if values else math.nan)
        return epochs, means, lows, highs

    def per_run(self, column: str, pick: str = "last") -> list[float]:
        values = []
        for run in self.runs:
            column_values = [row.get(column, math.nan) for row in run.epochs]
            finite = [v for v in column_values if not math.isnan(v)]
            if pick == "boundaries":  # what moves between epochs: nothing after the last one
                finite = finite[:-1]
            if not finite:
                continue
            picks = {"last": finite[-1], "max": max(finite)}
            values.append(picks[pick] if pick in picks else statistics.fmean(finite))
        return values


def group_runs(runs: Sequence[Run]) -> list[Group]:
    groups: dict[str, Group] = {}
    for run, label in zip(runs, label_runs(runs), strict=True):
        groups.setdefault(label, Group(label, [])).runs.append(run)
    return list(groups.values())


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summary_rows(groups: Sequence[Group]) -> tuple[list[str], list[list[object]]]:
    """The summary table: accuracy (mean +- std over seeds), difference from global, costs."""
    globals_ = [g for g in groups if g.label.split(",")[0].strip() == "global"]

    def baseline(group: Group) -> float:
        """The global group of the same experiment, else one that differs only in shuffle.*."""
        run = group.runs[0]
        same = [g for g in globals_ if experiment_of(g.runs[0]) == experiment_of(run)] + [
            g for g in globals_ if all(k.startswith("shuffle.") for k in _varying([g.runs[0], run]))
        ]
        return _mean_std(same[0].per_run("test_acc"))[0] if same else math.nan

    headers = [
        "strategy", "seeds", "final test acc", "best test acc", "vs global (pp)", "epoch s",
        "moved MB/rank/epoch", "storage MB/rank",
    ]  # fmt: skip
    rows = []
    for group in groups:
        final, final_std = _mean_std(group.per_run("test_acc"))
        base_final = baseline(group)
        best, best_std = _mean_std(group.per_run("test_acc", "max"))
        world = group.runs[0].epochs[0].get("world_size", 1) or 1
        moved = [
            v / world / 1e6 for v in group.per_run("bytes_planned", "boundaries") if not math.isnan(v)
        ]  # planned = what store mode moves, at each epoch boundary
        storage = [v / 1e6 for v in group.per_run("storage_bytes", "max")]
        rows.append([
            group.label,
            len(group.runs),
            f"{final:.4f} +- {final_std:.4f}",
            f"{best:.4f} +- {best_std:.4f}",
            f"{100 * (final - base_final):+.2f}" if not math.isnan(base_final) else "-",
            round(statistics.fmean(group.per_run("epoch_s", "mean")), 2),
            round(statistics.fmean(moved), 3) if moved else "-",
            round(max(storage), 2) if storage else "-",
        ])  # fmt: skip
    return headers, rows
