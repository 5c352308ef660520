"""Starting a run: in this process, under an outer launcher, or as N local ranks.

* Under ``torchrun`` (or ``srun`` + ``torchrun``) the environment names the rank: train directly.
* ``--nproc 1``: one process, no network.
* ``--nproc N``: PyTorch's elastic agent (``torch.distributed.launcher.api.elastic_launch``)
  starts N ranks with a c10d rendezvous on this machine. If one rank dies, the agent stops the
  others; a rank that hangs makes the others' collectives time out after ``dist.timeout_s``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from reshuffle import heartbeat
from reshuffle.config import ConfigError, ConfigWarning, RunConfig, SystemConfig, load_system_config
from reshuffle.config.loading import from_mapping, to_mapping
from reshuffle.train import distributed

log = logging.getLogger("reshuffle")


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_nproc(nproc: int | None) -> None:
    if nproc is not None and nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")


def run_dir_of(config: RunConfig) -> Path:
    return Path(config.log.dir) / config.name


def launch(
    config: RunConfig, system_path: str | None, *, nproc: int | None = None, resume: bool = False
) -> int:
    """Run ``config``; returns the process exit status (0: success)."""
    check_nproc(nproc)
    system = load_system_config(system_path)
    run_dir = run_dir_of(config)
    if config.dist.virtual_ranks:  # one process; dist.nproc does not apply
        if nproc not in (None, 1):
            raise ConfigError(
                f"dist.virtual_ranks={config.dist.virtual_ranks} trains every rank in one process; "
                f"leave out --nproc {nproc}"
            )
        from reshuffle.train.virtual import train_virtual

        return _report(train_virtual(config, system, run_dir, resume=resume), run_dir)
    nproc = nproc or config.dist.nproc
    placed = not distributed.launched_by_torchrun() and distributed.virtual_placement(
        config.dist.place, nproc, _gpus(), config.shuffle.mode, system.backend
    )
    if placed:
        print(f"reshuffle: {placed}", file=sys.stderr)
        virtual = dataclasses.replace(config.dist, virtual_ranks=nproc, nproc=1)
        return launch(dataclasses.replace(config, dist=virtual), system_path, resume=resume)
    config = dataclasses.replace(config, dist=dataclasses.replace(config.dist, nproc=nproc))  # as run
    if distributed.launched_by_torchrun() or nproc == 1:  # errors come as one line from here already
        summary = _train(config, system, run_dir, resume)
        return _report(summary, run_dir) if int(os.environ.get("RANK", "0")) == 0 else 0  # said once
    preflight(config, system, run_dir, resume)
    if system.backend == "auto" and (advice := distributed.idle_gpu_advice(nproc, _gpus())):
        warnings.warn(advice, ConfigWarning, stacklevel=2)  # one line, before the ranks start
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    port = system.master_port or distributed.free_port(system.master_addr)
    launch_config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"reshuffle-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"{system.master_addr}:{port}",
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    started = time.time()
    try:
        with _quiet_agent():  # the agent logs every rank's traceback; the line below says what failed
            results = elastic_launch(launch_config, _worker)(to_mapping(config), to_mapping(system), resume)
    except ChildFailedError as failed:
        print(
            f"reshuffle: error: {root_failure(failed.failures, run_dir / 'logs', started).line(run_dir)}",
            file=sys.stderr,
        )
        return 1
    return _report(results[0], run_dir)


def preflight(config: RunConfig, system: SystemConfig, run_dir: Path, resume: bool) -> None:
    """The checks every rank would make first, made once before any rank starts, so that a config
    error is one line in a second, not a failed job: the dataset and its transforms are known, a
    new run does not reuse a run directory with checkpoints, a resume matches its checkpoint."""
    from reshuffle.data.dataset import transform_for
    from reshuffle.train import state

    transform_for(config.data, "train", system)  # names an unknown dataset or transform
    per_node = config.dist.ranks_per_node
    if per_node and config.dist.nproc % per_node:
        raise ConfigError(
            f"dist.ranks_per_node={per_node} does not divide the {config.dist.nproc} ranks into whole "
            "nodes; give a divisor of --nproc (it stands for the ranks of one node)"
        )
    checkpoints = state.checkpoints_of(run_dir, config, resume)
    saved = state.load(checkpoints, config) if resume else None
    written_by = len(saved[state.RNG]["torch"]) if saved else config.dist.nproc
    if saved and saved[state.STEP] and written_by != config.dist.nproc and config.shuffle.mode == "store":
        raise ConfigError(
            f"--resume: the checkpoint was written mid-epoch (step {saved[state.STEP]}) by {written_by} "
            f"ranks and this job has {config.dist.nproc}; store mode changes the number of ranks only at "
            f"an epoch boundary: resume with {written_by} ranks (--nproc {written_by}) to the epoch's end"
        )


@contextlib.contextmanager
def _quiet_agent() -> Iterator[None]:
    """PyTorch's elastic agent and its process context log each failed rank's traceback at ERROR;
    the launcher prints the root cause in one line and the rank's log file holds the traceback."""
    loggers = [
        logging.getLogger(name)
        for name in list(logging.root.manager.loggerDict)
        if name.startswith(("torch.distributed.elastic", "torch.multiprocessing"))
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


CAUSED_BY = re.compile(r"caused by rank (\d+): (.*)$")  # how a PeerError names the rank whose error it was


class RootFailure(NamedTuple):
    rank: int  # the rank that caused the others to fail
    why: str  # one line
    others: int  # how many other ranks failed
    log_rank: int  # whose log holds the details (the reporter, for a rank that hung)

    def line(self, run_dir: Path) -> str:
        also = f" ({self.others} failed because of it)" if self.others else ""
        log = run_dir / "logs" / f"rank-{self.log_rank}.log"
        if self.why.startswith(("hung: ", "lost: ")):
            return f"rank {self.rank} {self.why}; the other ranks were stopped{also}. Details: {log}"
        return f"rank {self.rank} failed ({self.why}); the other ranks were stopped{also}. Traceback: {log}"


def root_failure(failures: dict[int, Any], logs: Path | None = None, since: float = 0.0) -> RootFailure:
    """The failure that caused the others: a rank another one named as silent (no heartbeat);
    else the earliest that is not a peer's consequence (a closed connection, a timed-out
    collective, a SIGTERM from the agent); else the earliest. torch's ``get_first_failure`` takes
    the earliest only, which is often a peer's "Connection closed" rather than the rank that raised.
    A rank another stopped (SIGKILL) as silent may be the only failure the agent saw: the reporter's
    diagnosis is then read from its log in ``logs`` (lines logged after ``since``, a time.time())."""

    def why(failure: Any) -> str:
        if (
            failure.exitcode is not None
            and failure.exitcode < 0
            and failure.signal_name() not in ("", "<N/A>")
        ):
            return f"killed by {failure.signal_name()}"
        reason = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
        lines = [line for line in str(reason).strip().splitlines() if line.strip()]
        return lines[-1].strip() if lines else f"exit code {failure.exitcode}"

    def consequence(failure: Any) -> bool:
        text = why(failure)
        return text == "killed by SIGTERM" or heartbeat.is_consequence(text)

    ordered = sorted(failures.items(), key=lambda item: (item[1].timestamp, item[0]))
    # A rank that named a peer that stopped answering; first the one that stopped it: the others
    # may then see its connection break ("lost") and fail before the stopper's error is recorded.
    naming = [(reporter, failure) for reporter, failure in ordered if heartbeat.HUNG.search(why(failure))]
    naming.sort(key=lambda item: heartbeat.STOPPED not in why(item[1]))  # stable: earliest first
    if naming:
        reporter, failure = naming[0]
        hung = heartbeat.HUNG.search(why(failure))
        assert hung is not None  # it was found above
        return RootFailure(int(hung.group(1)), hung.group(2).split("; rank ")[0], len(failures) - 1, reporter)
    causes = [(rank, failure) for rank, failure in ordered if not consequence(failure)]
    if not causes:  # a peer's error may carry the cause: "caused by rank R: ..."
        for _, failure in ordered:
            named = CAUSED_BY.search(why(failure))
            if named:
                return RootFailure(
                    int(named.group(1)), named.group(2), len(failures) - 1, int(named.group(1))
                )
    rank, failure = (causes or ordered)[0]
    if why(failure) == "killed by SIGKILL" and logs is not None:
        for reporter, cause in heartbeat.named_in_logs(logs, since):
            if reporter != rank and cause.startswith((f"rank {rank} hung: ", f"rank {rank} lost: ")):
                return RootFailure(rank, cause[len(f"rank {rank} ") :], len(failures) - 1, reporter)
    return RootFailure(rank, why(failure), len(failures) - 1, rank)


def _worker(config: dict[str, Any], system: dict[str, Any], resume: bool) -> dict[str, Any]:
    """One rank under the elastic agent (which set RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    run_config = from_mapping(RunConfig, config)
    summary = record(_train)(run_config, from_mapping(SystemConfig, system), run_dir_of(run_config), resume)
    assert summary is not None  # record() passes the result through; it returns None only on errors
    return summary


def _train(config: RunConfig, system: SystemConfig, run_dir: Path, resume: bool) -> dict[str, Any]:
    from reshuffle.train.loop import train

    return train(config, system, run_dir, resume=resume)


def _report(summary: dict[str, Any], run_dir: Path) -> int:
    if summary.get("status") == "stopped":
        print(f"stopped at train.max_steps; resume with --resume. Run directory: {run_dir}")
    elif summary:
        final = summary.get("final", {})
        accuracy = final.get("test_acc")
        print(
            f"done: {summary.get('epochs')} epochs, final test accuracy {accuracy:.4f}"
            if accuracy is not None
            else "done"
        )
        print(f"results: {run_dir} (metrics/epochs.csv, metrics/rank-*.csv, config.yaml, env.json, logs/)")
    return 0
