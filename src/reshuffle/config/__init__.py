"""Loading, validating and saving the system config and run configs.

Run config: a YAML file (see ``configs/``) plus ``key=value`` overrides, e.g.
``reshuffle run configs/smoke.yaml shuffle.strategy=partial shuffle.fraction=0.1``.

System config: ``--system FILE``, else ``$RESHUFFLE_SYSTEM``, else ``configs/system.yaml`` in the
working directory if present, else built-in defaults.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from reshuffle.config.loading import (
    ConfigError,
    ConfigWarning,
    from_mapping,
    merge,
    parse_overrides,
    read_yaml,
    to_mapping,
)
from reshuffle.config.schema import (
    BUILTIN_DATASETS,
    DataConfig,
    DatasetEntry,
    DistConfig,
    LogConfig,
    ModelConfig,
    RunConfig,
    ShuffleConfig,
    SyntheticConfig,
    SystemConfig,
    TrainConfig,
)

SYSTEM_ENV = "RESHUFFLE_SYSTEM"
DEFAULT_SYSTEM_FILE = Path("configs") / "system.yaml"


def load_run_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """The run config in ``path`` (None: defaults) with ``overrides`` applied and validated."""
    data = read_yaml(path) if path is not None else {}
    return check_run_config(from_mapping(RunConfig, merge(data, parse_overrides(overrides))))


def check_run_config(config: RunConfig) -> RunConfig:
    """Checks across fields and against the registries; ConfigError naming the key. Returns the
    config with the ``shuffle`` keys its strategy ignores back at their defaults (one warning each).

    The ``shuffle`` section is validated by the planner that owns those settings (one place, one
    message, the same for the Python API); the strategy registry says which keys each strategy takes.
    """
    from reshuffle.plan import ShufflePlanner

    shuffle, train = config.shuffle, config.train
    ignored = ignored_shuffle_keys(shuffle)
    for key in ignored:
        warnings.warn(
            f"shuffle.{key}={getattr(shuffle, key)} is ignored by shuffle.strategy={shuffle.strategy} "
            f"(it applies to {_users_of(key)})",
            ConfigWarning,
            stacklevel=3,
        )
    if ignored:
        defaults = ShuffleConfig()
        shuffle = dataclasses.replace(shuffle, **{key: getattr(defaults, key) for key in ignored})
        config = dataclasses.replace(config, shuffle=shuffle)
    try:
        # two samples with labels stand for the data: names and values are what is checked here
        # (two ranks on one node when the plan is node-aware)
        nodes = shuffle.level == "node"
        ShufflePlanner(2, 1 + nodes, partition=shuffle.partition, labels=[0, 0],
                       **planner_settings(shuffle, 1 + nodes))  # fmt: skip
    except ValueError as error:
        raise ConfigError(f"shuffle: {error}") from None
    positive = {
        "train.epochs": train.epochs,
        "train.batch_size": train.batch_size,
        "train.reference_batch": train.reference_batch,
        "train.bn_recalibrate_batches": train.bn_recalibrate_batches,
        "dist.nproc": config.dist.nproc,
        "dist.virtual_batch_limit": config.dist.virtual_batch_limit,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    non_negative: dict[str, float] = {
        "seed": config.seed,
        "train.lr": train.lr,
        "train.warmup_epochs": train.warmup_epochs,
        "train.mixup_alpha": train.mixup_alpha,
        "train.workers": train.workers,
        "train.checkpoint_every": train.checkpoint_every,
        "train.checkpoint_steps": train.checkpoint_steps,
        "train.max_steps": train.max_steps,
        "log.every_steps": config.log.every_steps,
        "dist.virtual_ranks": config.dist.virtual_ranks,
        "model.dropout": config.model.dropout,
    }
    for key, amount in non_negative.items():
        if amount < 0:
            raise ConfigError(f"{key} must not be negative, got {amount}")
    if train.keep_checkpoints < 1:
        raise ConfigError(f"train.keep_checkpoints must be at least 1, got {train.keep_checkpoints}")
    if not 0.0 <= train.label_smoothing < 1.0:
        raise ConfigError(f"train.label_smoothing must be in [0, 1), got {train.label_smoothing}")
    if config.shuffle.exchange_chunk_mb <= 0:
        raise ConfigError(
            f"shuffle.exchange_chunk_mb must be positive, got {config.shuffle.exchange_chunk_mb}"
        )
    if config.dist.timeout_s <= 0:
        raise ConfigError(f"dist.timeout_s must be positive, got {config.dist.timeout_s}")
    per_node, virtual = config.dist.ranks_per_node, config.dist.virtual_ranks
    if per_node is not None and (per_node < 1 or (virtual and virtual % per_node)):
        raise ConfigError(
            f"dist.ranks_per_node={per_node} must be at least 1 and divide the ranks into whole nodes"
            + (f" ({virtual} virtual ranks)" if virtual else "")
        )
    if virtual:
        planner_settings(config.shuffle, per_node)  # shuffle.level=node needs the node size
    if not config.name or "/" in config.name or config.name in (".", ".."):
        raise ConfigError(f"name must be a plain directory name (no '/'), got {config.name!r}")
    return config


def system_config_path(explicit: str | Path | None = None) -> Path | None:
    """Which system config file applies (see the module docstring), or None for the defaults."""
    if explicit is not None:
        return Path(explicit)
    if os.environ.get(SYSTEM_ENV):
        return Path(os.environ[SYSTEM_ENV])
    return DEFAULT_SYSTEM_FILE if DEFAULT_SYSTEM_FILE.is_file() else None


def load_system_config(path: str | Path | None = None) -> SystemConfig:
    """The system config at ``path`` (or found as in :func:`system_config_path`)."""
    source = system_config_path(path)
    data = read_yaml(source) if source is not None else {}
    if source is not None:
        data = {**data, "origin": str(Path(source).resolve())}
    return from_mapping(SystemConfig, data)


def dataset_entry(system: SystemConfig, name: str) -> DatasetEntry:
    """How ``name`` is loaded: the system config's entry, else the built-in one."""
    if name in system.datasets:
        return system.datasets[name]
    if name in BUILTIN_DATASETS:
        return from_mapping(DatasetEntry, BUILTIN_DATASETS[name], f"datasets.{name}")
    known = sorted(set(BUILTIN_DATASETS) | set(system.datasets))
    raise ConfigError(
        f"data.name: unknown dataset {name!r}; known: {', '.join(known)}. Add it to the system "
        f"config's datasets (e.g. an imagefolder entry with a path)"
    )


def dump_yaml(config: Any) -> str:
    """YAML text of a config dataclass (what a run saves as config.yaml)."""
    return yaml.safe_dump(to_mapping(config), sort_keys=False)


__all__ = [
    "ConfigError",
    "ConfigWarning",
    "DataConfig",
    "DatasetEntry",
    "DistConfig",
    "LogConfig",
    "ModelConfig",
    "RunConfig",
    "ShuffleConfig",
    "SyntheticConfig",
    "SystemConfig",
    "TrainConfig",
    "check_run_config",
    "dataset_entry",
    "dump_yaml",
    "load_run_config",
    "load_system_config",
    "planner_settings",
    "system_config_path",
]


def planner_settings(shuffle: ShuffleConfig, ranks_per_node: int | None = 1) -> dict[str, Any]:
    """The ``ShufflePlanner`` keywords the ``shuffle`` section sets for its strategy: ``fraction``
    if the strategy uses it, the options the strategy registry lists for it, and
    ``ranks_per_node`` (the node size, given by the caller) when ``shuffle.level`` is ``node``."""
    from reshuffle.plan import STRATEGIES

    strategy = STRATEGIES.get(shuffle.strategy)
    if strategy is None:
        return {"strategy": shuffle.strategy}  # the planner names the choices
    settings: dict[str, Any] = {key: getattr(shuffle, key) for key in strategy.option_defaults}
    if strategy.uses_fraction:
        settings["fraction"] = shuffle.fraction
    if shuffle.level == "node":
        if not ranks_per_node:
            raise ConfigError(
                "shuffle.level=node needs the ranks per node: set dist.ranks_per_node (virtual ranks "
                "have no node of their own; torchrun's LOCAL_WORLD_SIZE gives it for real ranks)"
            )
        settings["ranks_per_node"] = ranks_per_node
    return {"strategy": shuffle.strategy, **settings}


def ignored_shuffle_keys(shuffle: ShuffleConfig) -> list[str]:
    """``shuffle`` keys set away from their default that the chosen strategy does not use."""
    from reshuffle.plan import STRATEGIES

    if shuffle.strategy not in STRATEGIES:
        return []  # the planner's error names the strategies
    defaults = ShuffleConfig()
    used = set(planner_settings(shuffle))
    return [
        key
        for key in ("fraction", *_strategy_option_keys())
        if key not in used and getattr(shuffle, key) != getattr(defaults, key)
    ]


def _strategy_option_keys() -> list[str]:
    from reshuffle.plan import STRATEGIES

    return sorted({key for cls in STRATEGIES.values() for key in cls.option_defaults})


def _users_of(key: str) -> str:
    from reshuffle.plan import STRATEGIES

    users = sorted(
        name
        for name, cls in STRATEGIES.items()
        if key in cls.option_defaults or (key == "fraction" and cls.uses_fraction)
    )
    return " or ".join(f"shuffle.strategy={name}" for name in users)
