"""The test harness's own promise: a command that hangs fails its test with where it hung."""

from __future__ import annotations

import sys

import pytest

from spawn import run_command

CHILD = "import time\\ndef child_waits_here():\\n    time.sleep(600)\\nchild_waits_here()"
HANGS = f"""
import subprocess, sys, time
def parent_waits_here():
    child = subprocess.Popen([sys.executable, "-c", "{CHILD}"])
    print("started", flush=True)
    child.wait()
parent_waits_here()
"""


def test_a_hung_command_fails_with_every_processs_threads():
    with pytest.raises(AssertionError) as failure:
        run_command([sys.executable, "-c", HANGS], timeout=5)
    message = str(failure.value)
    assert "still running after 5 s (hung)" in message and "started" in message
    assert "parent_waits_here" in message and "child_waits_here" in message


def test_a_command_that_ends_gives_its_outcome():
    done = run_command([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], timeout=60)
    assert (done.returncode, done.stdout) == (3, "out\n")
