"""``reshuffle slurm CONFIG --nodes N --gpus-per-node G``: write an sbatch script for a run or a sweep.

Examples::

    reshuffle slurm configs/fashion-mnist.yaml --nodes 4 --gpus-per-node 4 --time 01:00:00 \\
        --partition gpu shuffle.strategy=partial shuffle.fraction=0.1
    reshuffle slurm configs/fashion-mnist.yaml --nodes 2 --gpus-per-node 4 \\
        --array-from-compare global local partial:0.1 --seeds 3 shuffle.partition=label-sorted
    sbatch runs/fashion-mnist/slurm/job.sbatch

The script runs one ``torchrun`` per node through ``srun`` (``--ntasks-per-node=1``); the agents
meet at a c10d rendezvous on the job's first node, and each starts ``--gpus-per-node`` ranks
(NCCL on GPUs through the system config's ``backend: auto``). Every run is started with
``--resume``, so a requeued or re-submitted job continues from its last checkpoint.

``--array-from-compare`` takes the strategies of ``reshuffle compare`` and writes a job array
with one task per (strategy, seed), into the same folders ``compare`` uses; when the array has
finished, the same ``reshuffle compare`` command skips every finished run and writes the report.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from reshuffle.config import ConfigError, load_run_config

_SLURM_TIME = re.compile(  # sbatch --time: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S, UNLIMITED
    r"^(\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|unlimited|infinite)$", re.IGNORECASE
)

#: Rendezvous ports are spread by job id so that jobs sharing a node do not collide.
PORT_BASE = 20000
PORT_SPAN = 20000


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "slurm", help="write an sbatch script (one torchrun per node; job arrays for sweeps)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("config", help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for the run(s)")
    parser.add_argument("--nodes", type=int, required=True, help="nodes per run")
    parser.add_argument(
        "--gpus-per-node", type=int, required=True, help="GPUs per node; one rank per GPU (0: CPU nodes)"
    )
    parser.add_argument(
        "--ranks-per-node", type=int, help="ranks per node (default: --gpus-per-node; needed when it is 0)"
    )
    parser.add_argument("--time", help="time limit, e.g. 02:00:00")
    parser.add_argument("--partition", help="Slurm partition")
    parser.add_argument("--account", help="Slurm account")
    parser.add_argument("--cpus-per-node", type=int, help="CPUs for each node's torchrun and its ranks")
    parser.add_argument(
        "--join-timeout", type=int, default=300, metavar="S",
        help="seconds a node waits for the others at the rendezvous before the job fails (torchrun: 600)",
    )  # fmt: skip
    parser.add_argument(
        "--array-from-compare", nargs="+", metavar="STRATEGY",
        help="a job array, one task per (strategy, seed), as `reshuffle compare --strategies`",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, default=1, help="seeds per strategy (with --array-from-compare)")
    parser.add_argument(
        "--setup", action="append", default=[], metavar="LINE",
        help="a shell line run before training, e.g. 'module load cuda' (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--store-dir", metavar="PATH",
        help="shuffle.store_dir, expanded on each node (e.g. '$SLURM_TMPDIR/reshuffle' for node-local disk)",
    )  # fmt: skip
    parser.add_argument("--python", default=sys.executable, help="Python that has reshuffle installed")
    parser.add_argument("--system", help="system config passed to every run")
    parser.add_argument(
        "--out", help="script path (default: <log.dir>/<name>/slurm/job.sbatch, or array.sbatch for a sweep)"
    )
    parser.set_defaults(run=run)


@dataclass(frozen=True, kw_only=True)
class SlurmJob:
    """Everything an sbatch script needs; ``runs`` holds one override list per run (more than one:
    a job array)."""

    name: str
    config: str
    runs: list[list[str]]
    nodes: int
    ranks_per_node: int
    gpus_per_node: int
    workdir: Path
    output_dir: Path
    python: str
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    cpus_per_node: int | None = None
    system: str | None = None
    store_dir: str | None = None
    join_timeout_s: int = 300
    setup: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.time is not None and not _SLURM_TIME.match(self.time):
            raise ConfigError(
                f"--time {self.time!r} is not a Slurm time limit: write minutes, MM:SS, HH:MM:SS, D-HH, "
                "D-HH:MM or D-HH:MM:SS (e.g. 02:00:00 for two hours)"
            )
        if self.join_timeout_s < 1:
            raise ConfigError(f"--join-timeout must be at least 1 second, got {self.join_timeout_s}")
        if self.nodes < 1:
            raise ConfigError(f"--nodes must be at least 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise ConfigError(f"--gpus-per-node must be 0 or more, got {self.gpus_per_node}")
        if self.ranks_per_node < 1:
            raise ConfigError(
                "ranks per node must be at least 1: give --gpus-per-node G (one rank per GPU), or "
                "--ranks-per-node R for CPU nodes"
            )
        if not self.runs:
            raise ConfigError("no runs to write a script for")
        if any(c.isspace() for c in str(self.output_dir)):
            raise ConfigError(
                f"{self.output_dir}: #SBATCH --output cannot hold whitespace; choose a name and log.dir "
                "without spaces"
            )


def render(job: SlurmJob) -> str:
    """The sbatch script (bash) for ``job``."""
    array = len(job.runs) > 1
    q = shlex.quote
    header = [
        "#!/bin/bash",
        f"# Written by `reshuffle slurm` for {job.name}: {job.nodes} node(s) x {job.ranks_per_node} rank(s)"
        + (f", {len(job.runs)} runs as a job array." if array else "."),
        "# Submit with: sbatch THIS_FILE. Every run starts with --resume: re-submitting continues it.",
        f"#SBATCH --job-name={job.name}",
        f"#SBATCH --nodes={job.nodes}",
        "#SBATCH --ntasks-per-node=1",
    ]
    if job.gpus_per_node:
        header.append(f"#SBATCH --gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_node:
        header.append(f"#SBATCH --cpus-per-task={job.cpus_per_node}")
    if job.time:
        header.append(f"#SBATCH --time={job.time}")
    if job.partition:
        header.append(f"#SBATCH --partition={job.partition}")
    if job.account:
        header.append(f"#SBATCH --account={job.account}")
    output = job.output_dir / ("%x-%A_%a.out" if array else "%x-%j.out")
    header.append(f"#SBATCH --output={output}")
    if array:
        header.append(f"#SBATCH --array=0-{len(job.runs) - 1}")

    body = ["", "set -euo pipefail", f"cd {q(str(job.workdir))}", *job.setup, ""]
    arguments = [
        " ".join([*(q(o) for o in overrides), *_store_dir(job, overrides)]) for overrides in job.runs
    ]
    if array:
        body.append('case "${SLURM_ARRAY_TASK_ID:?this script is a job array: submit it with sbatch}" in')
        for index, words in enumerate(arguments):
            body.append(f"  {index}) run_args=({words}) ;;")
        body.append('  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;')
        body.append("esac")
    else:
        body.append(f"run_args=({arguments[0]})")
    extra = f" --system {q(job.system)}" if job.system else ""
    body += [
        "",
        "# The torchrun agents of all nodes meet on the first node (c10d rendezvous). A node that",
        f"# cannot reach it within {job.join_timeout_s} s ends the job (RendezvousTimeoutError): check",
        "# that the nodes reach $head_node:$port (firewall, interface), then resubmit; the run resumes.",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"port=$(( {PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN} ))",
        "",
        f"srun --kill-on-bad-exit=1 {q(job.python)} -m torch.distributed.run \\",
        f'  --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node={job.ranks_per_node} \\',
        '  --rdzv-backend=c10d --rdzv-endpoint="$head_node:$port" --rdzv-id="$SLURM_JOB_ID" \\',
        f"  --rdzv-conf=join_timeout={job.join_timeout_s} \\",
        f'  -m reshuffle run {q(job.config)} "${{run_args[@]}}" --resume{extra}',
        "",
    ]
    return "\n".join(header + body)


def _store_dir(job: SlurmJob, overrides: list[str]) -> list[str]:
    """The ``shuffle.store_dir`` argument, double-quoted so that ``$SLURM_TMPDIR`` and the like
    expand on each node; in a job array every run gets its own folder under it."""
    if not job.store_dir:
        return []
    path = job.store_dir
    if len(job.runs) > 1:
        names = [o.partition("=")[2] for o in overrides if o.startswith("name=")]
        path = f"{path.rstrip('/')}/{names[-1] if names else job.name}"
    escaped = path.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`")
    return [f'"shuffle.store_dir={escaped}"']


def run_overrides(
    config: str, overrides: list[str], strategies: list[str] | None, seeds: int
) -> tuple[str, Path, list[list[str]]]:
    """(job name, folder for the script and logs, one override list per run); validates every run."""
    from reshuffle.commands.compare import compare_runs

    base = load_run_config(config, overrides)
    if strategies is None:
        return base.name, Path(base.log.dir) / base.name / "slurm", [list(overrides)]
    runs = compare_runs(config, overrides, strategies, seeds)
    return base.name, Path(base.log.dir) / base.name / "slurm", [r.overrides for r in runs]


def run(args: argparse.Namespace) -> int:
    if args.seeds != 1 and not args.array_from_compare:
        raise ConfigError("--seeds applies to --array-from-compare sweeps; leave it out for one run")
    name, folder, runs = run_overrides(args.config, list(args.overrides), args.array_from_compare, args.seeds)
    for overrides in runs:
        virtual = [
            o for o in overrides if o.startswith("dist.virtual_ranks=") and o != "dist.virtual_ranks=0"
        ]
        if virtual:
            raise ConfigError(
                f"{virtual[0]}: virtual ranks train in one process; run them with `reshuffle run` or "
                "`reshuffle compare`, not a multi-node Slurm job"
            )
    job = SlurmJob(
        name=name,
        config=args.config,
        runs=runs,
        nodes=args.nodes,
        ranks_per_node=args.ranks_per_node or args.gpus_per_node,
        gpus_per_node=args.gpus_per_node,
        workdir=Path.cwd(),
        output_dir=folder.resolve() if not folder.is_absolute() else folder,
        python=args.python,
        time=args.time,
        partition=args.partition,
        account=args.account,
        cpus_per_node=args.cpus_per_node,
        system=args.system,
        store_dir=args.store_dir,
        join_timeout_s=args.join_timeout,
        setup=list(args.setup),
    )
    out = (
        Path(args.out) if args.out else folder / ("array.sbatch" if args.array_from_compare else "job.sbatch")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    job.output_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create the --output folder
    text = render(job)
    if out.is_file() and out.read_text() != text:
        print(f"replacing {out} (another job's script; --out PATH keeps both)")
    out.write_text(text)
    out.chmod(0o755)
    print(f"wrote {out}: {len(runs)} run(s), {job.nodes} node(s) x {job.ranks_per_node} rank(s)")
    print(f"submit:  sbatch {out}")
    if args.array_from_compare:
        compare = [
            "reshuffle",
            "compare",
            args.config,
            *args.overrides,
            "--strategies",
            *args.array_from_compare,
        ]
        if args.seeds != 1:
            compare += ["--seeds", str(args.seeds)]
        print(
            "report:  when the array has finished, "
            + " ".join(shlex.quote(a) for a in compare)
            + "  (skips the finished runs, writes the report)"
        )
    return 0
