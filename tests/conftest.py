"""Shared test settings: CPU only, hypothesis profile sized for a 2-core CI machine.

The suite is a CPU suite (gloo, deterministic comparisons against real DDP processes, errors such
as fp16 without CUDA): on a machine with GPUs it hides them from this process and every process
it starts, so a run means the same everywhere. GPU paths are exercised by ``studies/gpu_check.sh``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initialises CUDA

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("RESHUFFLE_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,  # a failure in CI reproduces locally
)
settings.load_profile("ci")


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    """The real Fashion-MNIST folder (Debian's package). Skipped where it is missing, except in CI,
    which sets RESHUFFLE_REQUIRE_REAL_DATA=1 so that a missing install fails instead."""
    from reshuffle.data.fashion_mnist import DEBIAN_PATH

    if not Path(DEBIAN_PATH, "train-images-idx3-ubyte.gz").is_file():
        if os.environ.get("RESHUFFLE_REQUIRE_REAL_DATA") == "1":
            pytest.fail("real Fashion-MNIST is required but missing: apt-get install dataset-fashion-mnist")
        pytest.skip(
            "real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist); CI requires it"
        )
    return Path(DEBIAN_PATH)
