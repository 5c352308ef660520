"""Presets for ``reshuffle simulate``: workloads, clusters, and calibration from a benchmark record.

The ImageNet preset is the IPDPS 2022 setting: ImageNet-1k (1,281,167 samples, ~110 KB JPEGs),
ResNet-50 at 32 samples per worker on V100 GPUs in mixed precision (0.035 s per step; fp32 takes
about 0.08 s: ``--iteration-s 0.08``), on an ABCI-like
cluster (4 GPUs and two 100 Gb/s InfiniBand links per node: 6.25 GB/s per GPU; 1.6 TB of
node-local NVMe per node: 400 GB per GPU). The Fashion-MNIST preset is the small CNN of this
project's configs on this kind of 2-core machine.

``calibrated(record)`` turns a benchmark record (figures from ``bench/exchange.py`` and
``bench/train.py`` on one machine, see ``bench/recorded/``) into a workload and a cluster, so that
the model can be checked against what that machine measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reshuffle.simulate.model import Cluster, Workload


def resnet50_bn_channels() -> tuple[int, ...]:
    """Channels of ResNet-50's 53 BatchNorm layers (stem, then bottlenecks w, w, 4w; the first
    block of each stage adds a downsample BatchNorm of 4w)."""
    channels = [64]
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            channels += [width, width, 4 * width]
            if block == 0:
                channels.append(4 * width)
    return tuple(channels)


WORKLOADS: dict[str, Workload] = {
    "imagenet": Workload(
        name="imagenet",
        num_samples=1_281_167,
        sample_bytes=110_000,
        batch_size=32,
        iteration_s=0.035,  # V100, mixed precision (NVIDIA: over 2x the fp32 rate); fp32: 0.08
        bn_channels=resnet50_bn_channels(),
    ),
    "fashion-mnist": Workload(
        name="fashion-mnist",
        num_samples=60_000,
        sample_bytes=784,
        batch_size=64,
        iteration_s=0.03,  # small CNN (width 16), batch 64, one rank of two on 2 cores
        bn_channels=(16, 32, 64),
    ),
}

# Reference style (per-sample): measured by bench/reference.py on this project's 2-vCPU machine
# while a model trains (110 KB samples): 4.17 ms per moved sample, 0.37 us of Python planning per
# sample of N. See docs/simulate.md for how the result depends on them.
MEASURED_PER_SAMPLE_S = 4.17e-3
MEASURED_REFERENCE_PLAN_S_PER_SAMPLE = 0.37e-6

CLUSTERS: dict[str, Cluster] = {
    "abci": Cluster(
        name="abci",
        bandwidth_Bps=6.25e9,
        latency_s=2e-6,
        storage_bytes=400e9,
        pfs_Bps=50e9,
        store_write_Bps=1.5e9,
        message_s=2e-6,
        plan_s=0.005,
        per_sample_s=MEASURED_PER_SAMPLE_S,
        reference_plan_s_per_sample=MEASURED_REFERENCE_PLAN_S_PER_SAMPLE,
    ),
    "laptop": Cluster(
        name="laptop",
        bandwidth_Bps=1.0e9,  # gloo over loopback
        latency_s=50e-6,
        storage_bytes=50e9,
        pfs_Bps=0.3e9,
        store_write_Bps=0.13e9,
        message_s=20e-6,
        plan_s=0.005,
        per_sample_s=MEASURED_PER_SAMPLE_S,
        reference_plan_s_per_sample=MEASURED_REFERENCE_PLAN_S_PER_SAMPLE,
    ),
}

#: Each preset's default cluster.
DEFAULT_CLUSTER = {"imagenet": "abci", "fashion-mnist": "laptop"}


def load_record(path: str | Path) -> dict[str, Any]:
    """A benchmark record (JSON); see ``bench/recorded/this-machine.json`` for the fields."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such benchmark record (bench/recorded/ has one)")
    record = json.loads(path.read_text())
    for key in ("exchange", "train"):
        if key not in record:
            raise ValueError(f"{path}: a benchmark record needs an {key!r} section")
    return record


def calibrated(record: dict[str, Any]) -> tuple[Workload, Cluster]:
    """The workload and cluster of a benchmark record.

    * network bandwidth: the bytes of the exchange benchmark over its raw ``all_to_all_single``
      time; store write rate: the same bytes over what the whole exchange took beyond that;
    * step time: the ``global`` index-mode epoch of the training benchmark over its iterations.
    """
    exchange, train = record["exchange"], record["train"]
    nbytes = float(exchange["bytes_per_rank"])
    raw_s, whole_s = float(exchange["raw_all_to_all_s"]), float(exchange["exchange_s"])
    if not 0 < raw_s < whole_s:
        raise ValueError("benchmark record: need 0 < raw_all_to_all_s < exchange_s")
    ranks = int(train["ranks"])
    per_rank = -(-int(train["num_samples"]) // ranks)
    iterations = -(-per_rank // int(train["batch_size"]))
    workload = Workload(
        name=f"{train['dataset']} (recorded)",
        num_samples=int(train["num_samples"]),
        sample_bytes=int(train["sample_bytes"]),
        batch_size=int(train["batch_size"]),
        iteration_s=float(train["global_epoch_s"]) / iterations,
        bn_channels=tuple(train.get("bn_channels", ())),
    )
    cluster = Cluster(
        name=f"{record.get('machine', 'recorded machine')}",
        bandwidth_Bps=nbytes / raw_s,
        latency_s=float(exchange.get("latency_s", 50e-6)),
        storage_bytes=float(record.get("storage_bytes", 50e9)),
        pfs_Bps=float(record.get("pfs_Bps", 0.3e9)),
        store_write_Bps=nbytes / (whole_s - raw_s),
        message_s=float(exchange.get("message_s", 20e-6)),
    )
    return workload, cluster
