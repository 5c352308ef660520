"""``reshuffle compare CONFIG --strategies ...``: one run per (strategy, seed), then a report.

Examples::

    reshuffle compare configs/fashion-mnist.yaml name=sorted shuffle.partition=label-sorted \\
        --strategies global local partial:0.1 partial:0.01 importance --seeds 3
    reshuffle compare configs/fashion-mnist.yaml name=norms --virtual-ranks 64 \\
        --strategies global local local+model.norm=sync-batch

A strategy is ``NAME`` or ``NAME:FRACTION`` (``partial:0.1``), optionally followed by
``+key=value`` overrides for that strategy alone (``local+model.norm=group``). Runs go to
``<log.dir>/<name>/runs/<strategy>-seed<k>/`` one after another (the task-parallel pattern of
HPC sweeps: ``reshuffle slurm --array-from-compare`` runs them as an array); a run that already
finished is skipped, one that stopped is resumed. The report goes to ``<log.dir>/<name>/report/``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from reshuffle.config import ConfigError, RunConfig, load_run_config
from reshuffle.config.loading import to_mapping


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare", help="run several strategies and seeds, then write a report", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("config", help="run config (YAML) shared by every run")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every run")
    parser.add_argument(
        "--strategies", nargs="+", required=True, metavar="STRATEGY",
        help="e.g. global local partial:0.1 importance local+model.norm=group (partial alone: the config's "
        "shuffle.fraction; key=value words here are overrides for every run)",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, default=1, help="seeds per strategy (0 .. N-1 added to seed)")
    parser.add_argument("--nproc", type=int, help="local ranks per run (default: dist.nproc)")
    parser.add_argument("--virtual-ranks", type=int, metavar="M", help="train every run as M virtual ranks")
    parser.add_argument("--system", help="system config (default: $RESHUFFLE_SYSTEM or configs/system.yaml)")
    parser.set_defaults(run=run)


def split_strategies(items: list[str]) -> tuple[list[str], list[str]]:
    """``--strategies`` takes every word after it: ``key=value`` words among them (before any
    ``+``) are overrides for every run, not strategies."""
    overrides = [item for item in items if "=" in item.split("+")[0]]
    return [item for item in items if item not in overrides], overrides


def parse_strategy(spec: str, config_fraction: float = 0.0) -> tuple[str, list[str]]:
    """``partial:0.1+model.norm=group`` -> (``partial-0.1-model.norm-group``, overrides).

    ``partial`` without ``:Q`` takes the config's ``shuffle.fraction`` (one rule with ``run``);
    the other strategies run with fraction 0 unless ``:Q`` is given."""
    head, *extra = spec.split("+")
    name, _, fraction = head.partition(":")
    if not name:
        raise ConfigError(f"--strategies: empty strategy in {spec!r}; write e.g. partial:0.1")
    if name == "partial" and not fraction:
        if config_fraction <= 0:
            raise ConfigError(
                f"--strategies: {spec!r} needs a fraction: write partial:Q (e.g. partial:0.1), or set "
                "shuffle.fraction in the config"
            )
        fraction = str(config_fraction)
    overrides = [f"shuffle.strategy={name}", f"shuffle.fraction={fraction or 0}"]
    for item in extra:
        if "=" not in item:
            raise ConfigError(
                f"--strategies: {item!r} in {spec!r} is not key=value (e.g. local+model.norm=group)"
            )
        overrides.append(item)
    slug = spec.replace(":", "-").replace("+", "_").replace("=", "-").replace("/", "-")
    return slug, overrides


@dataclass(frozen=True)
class CompareRun:
    """One run of a comparison: its full override list and its resolved config."""

    overrides: list[str]
    config: RunConfig


def compare_runs(
    config_path: str, overrides: list[str], strategies: list[str], seeds: int
) -> list[CompareRun]:
    """Every run of the comparison, resolved (errors before anything trains)."""
    strategies, more = split_strategies(strategies)
    overrides = [*overrides, *more]
    base = load_run_config(config_path, overrides)
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    if not strategies:
        raise ConfigError("--strategies: no strategy given (key=value words are overrides)")
    root = Path(base.log.dir) / base.name
    runs = []
    for spec in strategies:
        slug, extra = parse_strategy(spec, base.shuffle.fraction)
        for k in range(seeds):
            run_overrides = [
                *overrides,
                *extra,
                f"seed={base.seed + k}",
                f"name={slug}-seed{k}",
                f"log.dir={root / 'runs'}",
            ]
            runs.append(CompareRun(run_overrides, load_run_config(config_path, run_overrides)))
    return runs


def plan_runs(config_path: str, overrides: list[str], strategies: list[str], seeds: int) -> list[RunConfig]:
    """Every run of the comparison, as resolved configs (errors before anything trains)."""
    return [r.config for r in compare_runs(config_path, overrides, strategies, seeds)]


def run(args: argparse.Namespace) -> int:
    from reshuffle.report import write_report
    from reshuffle.train.launch import check_nproc, launch, run_dir_of

    check_nproc(args.nproc)  # before any run starts
    overrides = list(args.overrides)
    if args.virtual_ranks is not None:
        overrides.append(f"dist.virtual_ranks={args.virtual_ranks}")
    strategies, more = split_strategies(args.strategies)
    overrides += more
    configs = plan_runs(args.config, overrides, strategies, args.seeds)
    base = load_run_config(args.config, overrides)
    failed = []
    for index, config in enumerate(configs, start=1):
        run_dir = run_dir_of(config)
        summary = run_dir / "summary.json"
        if summary.is_file() and json.loads(summary.read_text()).get("status") == "completed":
            _check_same_run(run_dir, config)
            print(f"[{index}/{len(configs)}] {config.name}: finished earlier, skipped")
            continue
        print(f"[{index}/{len(configs)}] {config.name}", flush=True)
        resume = (run_dir / "checkpoints").is_dir()
        status = launch(
            config, args.system, nproc=None if config.dist.virtual_ranks else args.nproc, resume=resume
        )
        if status != 0:
            failed.append(config.name)
    if failed:
        print(
            f"reshuffle: error: run(s) {', '.join(failed)} failed; fix and re-run compare "
            "(finished runs are kept)"
        )
        return 1
    out = Path(base.log.dir) / base.name / "report"
    table = write_report([run_dir_of(c) for c in configs], out, title=f"Compare: {base.name}")
    print(table)
    print(f"report: {out / 'report.md'}")
    return 0


def _check_same_run(run_dir: Path, config: RunConfig) -> None:
    """A finished run is reused only if it ran these settings (``log`` and ``dist.nproc`` aside)."""

    def settings(c: RunConfig) -> dict:
        plain = to_mapping(c)
        plain.pop("log", None)
        plain.get("dist", {}).pop("nproc", None)
        return plain

    if settings(load_run_config(run_dir / "config.yaml")) != settings(config):
        raise ConfigError(
            f"{run_dir} holds a finished run of other settings; give this comparison another name (name=...) "
            "or log.dir"
        )
