"""Every ``reshuffle ...`` command the docs show runs as written (issue 19): the code blocks of
the README and of every page under docs/, the ``Try:`` lines of ``configs/*.yaml`` and each
command's ``--help`` examples, in that order, in one scratch directory (so a later command finds
what an earlier one wrote; a command shown twice runs once). Commands that train are shrunk (one
epoch, a slice of the data, at most 2 local ranks, 1 seed); nothing else about them changes, and
any non-zero exit fails the test with the command and its output."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("run", "compare", "report", "plan", "simulate", "slurm", "verify")
SHRINK = ["train.epochs=1", "data.train_limit=1024", "data.test_limit=128", "log.tensorboard=false",
          "log.progress=lines"]  # fmt: skip


def _commands_in(text: str) -> list[str]:
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip().removeprefix("$ ").removeprefix("# Try: ").removeprefix(".venv/bin/")
        if line.startswith("reshuffle ") and line.split()[1] in COMMANDS and "..." not in line:
            found.append(re.sub(r"\s+#.*$", "", line))
    return found


def doc_pages() -> list[Path]:
    """The README, then the pages under docs/ (a page's commands run in its order)."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def documented_commands() -> list[str]:
    commands = []
    for page in doc_pages():
        blocks = re.findall(r"```(bash|console)\n(.*?)```", page.read_text(), re.S)
        commands += [c for c in _commands_in("\n".join(body for _, body in blocks)) if c not in commands]
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        commands += _commands_in(
            "\n".join(line for line in config.read_text().splitlines() if "Try:" in line)
        )
    for name in COMMANDS:
        result = subprocess.run([sys.executable, "-m", "reshuffle", name, "--help"], capture_output=True,
                                text=True, timeout=60, cwd=ROOT)  # fmt: skip
        commands += _commands_in(result.stdout)
    return commands


def shrunk(command: str) -> str:
    words = command.split()
    if words[1] in ("run", "compare", "slurm"):  # overrides go right after the config
        words[3:3] = SHRINK
    if words[1] in ("run", "compare") and not {"--nproc", "--virtual-ranks", "--resume"} & set(words):
        words.append("--nproc 2")  # the config's dist.nproc (4 in the default experiment)
    text = " ".join(words)
    text = re.sub(r"--nproc \d+", "--nproc 2", text)
    text = re.sub(r"--seeds \d+", "--seeds 1", text)
    text = re.sub(r"train\.epochs=\d+", "train.epochs=1", text)
    return text.replace("reshuffle ", f"{sys.executable} -m reshuffle ", 1)


def test_the_docs_show_the_commands_this_test_runs():
    commands = documented_commands()
    assert len(commands) >= 20, commands
    for name in COMMANDS:
        assert any(c.split()[1] == name for c in commands), name


@pytest.mark.slow
def test_every_documented_command_runs_as_written(tmp_path, fashion_mnist):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "bench").symlink_to(ROOT / "bench")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RESHUFFLE_SYSTEM": str(ROOT / "configs" / "system.yaml")}
    for command in documented_commands():
        result = subprocess.run(["bash", "-c", shrunk(command)], capture_output=True, text=True, timeout=600,
                                cwd=tmp_path, env=env)  # fmt: skip
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
