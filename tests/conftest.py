"""Shared test settings: CPU only, hypothesis profile sized for a 2-core CI machine.

The suite is a CPU suite (gloo, deterministic comparisons against real DDP processes, errors such
as fp16 without CUDA): on a machine with GPUs it hides them from this process and every process
it starts, so a run means the same everywhere. GPU paths are exercised by ``studies/gpu_check.sh``.
"""

from __future__ import annotations

import os

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
