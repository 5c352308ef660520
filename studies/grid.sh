#!/usr/bin/env bash
# Reproduction grid (docs/results.md): Fashion-MNIST, small BatchNorm CNN, 4 ranks (virtual ranks:
# DDP's semantics in one process), 3 seeds, label-sorted and random initial partitions; strategies
# crossed with the normalisation fixes (SyncBatchNorm, GroupNorm, BatchNorm recalibration).
# Usage: studies/grid.sh [SEEDS]   (default 3); then: .venv/bin/reshuffle report runs/grid/<partition>
# Real-process check of a few cells: studies/grid.sh real
set -euo pipefail
cd "$(dirname "$0")/.."
common=(data.train_limit=20000 train.epochs=5 log.dir=runs/grid log.tensorboard=false log.every_steps=0
        train.checkpoint_every=0)
if [[ "${1:-}" == real ]]; then
  # The same cells with 4 real gloo processes (seed 0), to confirm the virtual-rank figures.
  .venv/bin/reshuffle compare configs/fashion-mnist.yaml shuffle.partition=label-sorted "${common[@]}" \
    name=label-sorted-real --strategies local local+model.norm=sync-batch --seeds 1 --nproc 4
  exit
fi
seeds=${1:-3}
.venv/bin/reshuffle compare configs/fashion-mnist.yaml shuffle.partition=label-sorted "${common[@]}" \
  name=label-sorted --seeds "$seeds" --virtual-ranks 4 \
  --strategies global local partial:0.1 partial:0.01 importance \
    local+model.norm=sync-batch local+model.norm=group local+train.bn_recalibrate=true \
    partial:0.01+train.bn_recalibrate=true global+model.norm=group
.venv/bin/reshuffle compare configs/fashion-mnist.yaml shuffle.partition=random "${common[@]}" \
  name=random --seeds "$seeds" --virtual-ranks 4 \
  --strategies global local partial:0.1 partial:0.01 importance local+model.norm=sync-batch
