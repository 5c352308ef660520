"""``reshuffle slurm``: the generated sbatch script, run for real with stand-in Slurm commands.

The stand-ins (``sbatch``, ``srun``, ``scontrol``) execute locally: ``sbatch`` runs the script
once per array task with the variables Slurm would set, ``srun`` starts its command once per
"node" in parallel, as ``--ntasks-per-node=1`` does, and ``scontrol show hostnames`` names
localhost. So two torchrun agents meet at the script's c10d rendezvous and train two ranks on CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from reshuffle.cli import main
from reshuffle.commands.slurm import PORT_BASE, PORT_SPAN, SlurmJob, render
from reshuffle.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]

SBATCH = r"""#!/bin/bash
# stand-in sbatch: run the script here, once per array task, as Slurm would set it up
set -u
script="$1"
nodes=$(sed -n 's/^#SBATCH --nodes=//p' "$script")
array=$(sed -n 's/^#SBATCH --array=0-//p' "$script")
export SLURM_JOB_NODELIST=localhost SLURM_JOB_NUM_NODES="$nodes" SLURM_NNODES="$nodes"
status=0
for task in $(seq 0 "${array:-0}"); do
  export SLURM_JOB_ID=$(( STAND_IN_JOB_ID + task * 20000 ))
  if [ -n "$array" ]; then export SLURM_ARRAY_TASK_ID=$task; fi
  bash "$script" || status=$?
done
exit $status
"""

SRUN = r"""#!/bin/bash
# stand-in srun: one copy of the command per node, in parallel (--ntasks-per-node=1)
while [[ "$1" == --* ]]; do shift; done
pids=()
for node in $(seq 0 $(( SLURM_JOB_NUM_NODES - 1 ))); do
  SLURM_NODEID=$node SLURM_PROCID=$node "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""

SCONTROL = r"""#!/bin/bash
# stand-in scontrol: `scontrol show hostnames LIST` names this machine
[ "$1 $2" = "show hostnames" ] || { echo "stand-in scontrol: unsupported: $*" >&2; exit 2; }
echo localhost
"""


def _stand_ins(directory: Path) -> Path:
    directory.mkdir()
    for name, text in (("sbatch", SBATCH), ("srun", SRUN), ("scontrol", SCONTROL)):
        path = directory / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return directory


def _free_job_id() -> int:
    """A job id whose rendezvous port (PORT_BASE + id % PORT_SPAN) is free on this machine: the
    first of many spread-out candidates that binds (as the rendezvous will, SO_REUSEADDR: a port
    a test before left in TIME_WAIT is free to it). One candidate used to be tried, and it failed
    when an earlier test's ranks had used that port."""
    for offset in range(7919, 7919 + 97 * 200, 97):
        offset %= PORT_SPAN
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", PORT_BASE + offset))
            except OSError:
                continue
            return offset
    raise RuntimeError("no free port for the stand-in job")


def test_generated_array_script_trains_every_run_on_two_nodes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    overrides = [
        "data.synthetic.num_samples=512",
        "data.synthetic.test_samples=128",
        "train.epochs=1",
        "log.tensorboard=false",
        "name=sweep",
    ]
    status = main(
        [
            "slurm", "configs/smoke.yaml", *overrides, "--nodes", "2", "--gpus-per-node", "0",
            "--ranks-per-node", "1", "--time", "00:10:00", "--python", sys.executable,
            "--setup", "export OMP_NUM_THREADS=1", "--array-from-compare", "global", "partial:0.25",
        ]
    )  # fmt: skip
    assert status == 0
    script = tmp_path / "runs" / "sweep" / "slurm" / "array.sbatch"  # a run's job.sbatch is another file
    text = script.read_text()
    assert "#SBATCH --array=0-1" in text and "#SBATCH --nodes=2" in text
    assert "gpus-per-node" not in text  # CPU nodes request no GPUs
    printed = capsys.readouterr().out
    assert "sbatch" in printed and "reshuffle compare" in printed

    bin_dir = _stand_ins(tmp_path / "bin")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "STAND_IN_JOB_ID": str(_free_job_id()),
        "RESHUFFLE_SYSTEM": str(ROOT / "configs" / "system.yaml"),
        "CUDA_VISIBLE_DEVICES": "",  # both stand-in "nodes" share this machine: on one GPU, NCCL would refuse
    }
    result = subprocess.run(
        ["sbatch", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    for run in ("global-seed0", "partial-0.25-seed0"):
        run_dir = tmp_path / "runs" / "sweep" / "runs" / run
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed", summary
        environment = json.loads((run_dir / "env.json").read_text())
        assert environment["world_size"] == 2  # one rank on each of the two "nodes"
    # After the array, the same compare skips both runs and writes the report.
    assert main(["compare", "configs/smoke.yaml", *overrides, "--strategies", "global", "partial:0.25"]) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier, skipped") == 2
    assert (tmp_path / "runs" / "sweep" / "report" / "report.md").is_file()


def _job(**changes) -> SlurmJob:
    fields = dict(
        name="exp",
        config="configs/smoke.yaml",
        runs=[["shuffle.strategy=local", "name=exp"]],
        nodes=4,
        ranks_per_node=8,
        gpus_per_node=8,
        workdir=Path("/scratch/project"),
        output_dir=Path("/scratch/project/runs/exp/slurm"),
        python="/opt/env/bin/python",
    )
    fields.update(changes)
    return SlurmJob(**fields)


def test_script_runs_one_torchrun_per_node_with_a_c10d_rendezvous():
    text = render(_job(partition="gpu", account="proj", time="02:00:00", cpus_per_node=64))
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=64",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --time=02:00:00",
        "#SBATCH --output=/scratch/project/runs/exp/slurm/%x-%j.out",
        "--nproc-per-node=8",
        '--rdzv-backend=c10d --rdzv-endpoint="$head_node:$port" --rdzv-id="$SLURM_JOB_ID"',
        "--rdzv-conf=join_timeout=300",
        "within 300 s ends the job (RendezvousTimeoutError)",
    ):
        assert line in text, line
    assert "--array" not in text and "SLURM_ARRAY_TASK_ID" not in text
    assert "srun --kill-on-bad-exit=1 /opt/env/bin/python -m torch.distributed.run" in text
    assert '-m reshuffle run configs/smoke.yaml "${run_args[@]}" --resume' in text


def test_override_values_are_quoted_and_store_dirs_expand_per_node(tmp_path):
    job = _job(
        runs=[["name=a-seed0", "log.dir=my runs"], ["name=b-seed0", "log.dir=my runs"]],
        store_dir="$SLURM_TMPDIR/stores",
    )
    text = render(job)
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0
    # Evaluate the argument list of task 1 the way bash will on a node.
    case = text[text.index("case ") : text.index("esac") + 4]
    probe = tmp_path / "probe.sh"
    probe.write_text(f'{case}\nprintf "%s\\n" "${{run_args[@]}}"\n')
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "1", "SLURM_TMPDIR": "/local/job7"}
    words = subprocess.run(
        ["bash", str(probe)], env=env, capture_output=True, text=True, timeout=30, check=True
    ).stdout.splitlines()
    assert words == ["name=b-seed0", "log.dir=my runs", "shuffle.store_dir=/local/job7/stores/b-seed0"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"nodes": 0}, "--nodes"),
        ({"ranks_per_node": 0, "gpus_per_node": 0}, "--ranks-per-node"),
        ({"output_dir": Path("/a b/slurm")}, "whitespace"),
    ],
)
def test_bad_job_shapes_are_refused_with_the_fix(changes, message):
    with pytest.raises(ConfigError, match=message):
        _job(**changes)


def test_virtual_ranks_are_refused_for_a_slurm_job(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    status = main(
        ["slurm", "configs/smoke.yaml", "dist.virtual_ranks=8", "--nodes", "1", "--gpus-per-node", "1"]
    )
    assert status == 2
    assert "virtual ranks train in one process" in capsys.readouterr().err


@pytest.mark.parametrize("good", ["30", "30:00", "02:00:00", "1-12", "1-12:30", "2-00:00:00", "UNLIMITED"])
def test_time_limits_in_slurm_formats_are_accepted(good):
    assert _job(time=good).time == good


@pytest.mark.parametrize("bad", ["1h", "2 hours", "1:2:3:4", "-5"])
def test_a_time_limit_slurm_would_reject_is_an_error_here(bad):
    with pytest.raises(ConfigError, match=r"is not a Slurm time limit: write minutes, MM:SS, HH:MM:SS"):
        _job(time=bad)
