"""``reshuffle run CONFIG [key=value ...]``: train one experiment.

Examples::

    reshuffle run configs/smoke.yaml --nproc 2
    reshuffle run configs/fashion-mnist.yaml --nproc 4 shuffle.strategy=local name=local-4
    reshuffle run configs/fashion-mnist.yaml --resume train.epochs=20  # continue the run, as it ran
    reshuffle run configs/fashion-mnist.yaml --virtual-ranks 256 name=v256  # 256 DDP ranks, one process
    torchrun --nproc-per-node 4 -m reshuffle run configs/fashion-mnist.yaml

Results go to ``<log.dir>/<name>/``.
"""

from __future__ import annotations

import argparse

from reshuffle.config import ConfigError, RunConfig, load_run_config
from reshuffle.config.loading import to_mapping


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run", help="train with DDP under a shuffling strategy", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("config", help="run config (YAML); configs/ has examples")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="override config keys, e.g. train.epochs=5"
    )
    parser.add_argument(
        "--nproc", type=int, help="local ranks to start (default: dist.nproc); ignored under torchrun"
    )
    parser.add_argument(
        "--virtual-ranks",
        type=int,
        metavar="M",
        help="train as M DDP ranks in this one process (dist.virtual_ranks; exact DDP semantics)",
    )
    parser.add_argument(
        "--resume", action="store_true",
        help="continue from the run's last checkpoint with its saved config.yaml (only safe keys change)",
    )  # fmt: skip
    parser.add_argument(
        "--system",
        help="system config (datasets, backend); default: $RESHUFFLE_SYSTEM or configs/system.yaml",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from reshuffle.train.launch import launch

    overrides = list(args.overrides)
    if args.virtual_ranks is not None:
        overrides.append(f"dist.virtual_ranks={args.virtual_ranks}")
    config = load_run_config(args.config, overrides)
    if args.resume:
        config = saved_config(config, overrides)
    return launch(config, args.system, nproc=args.nproc, resume=args.resume)


def saved_config(config: RunConfig, overrides: list[str]) -> RunConfig:
    """``--resume``: the run's own ``config.yaml`` (how it ran, with every override it was given),
    with those of ``overrides`` that a resume may change, and this invocation's ``train.max_steps``;
    an override that would change anything else is an error that names it."""
    from reshuffle.train.launch import run_dir_of
    from reshuffle.train.state import FREE_ON_RESUME

    saved_path = run_dir_of(config) / "config.yaml"
    if not saved_path.is_file():
        return config  # nothing ran yet: --resume starts it
    saved = load_run_config(saved_path)
    keep, changed = [], []
    for item in overrides:
        key = item.partition("=")[0].strip()
        section, _, name = key.partition(".")
        if section == "log" or key == "name" or (section, name) in FREE_ON_RESUME:
            keep.append(item)
        elif to_mapping(load_run_config(saved_path, [item])) != to_mapping(saved):
            changed.append(key)
    if changed:
        free = ", ".join(sorted(f"{s}.{n}" for s, n in FREE_ON_RESUME))
        raise ConfigError(
            f"--resume continues {saved_path.parent} as its config.yaml says; {', '.join(changed)} cannot "
            f"change on a resume (these can: {free}, log.*). Start a new run (name=...) to change them"
        )
    # train.max_steps stops the invocation it is given to, not the run: never carried over
    return load_run_config(saved_path, [*keep, f"train.max_steps={config.train.max_steps}"])
