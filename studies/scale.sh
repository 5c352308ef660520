#!/usr/bin/env bash
# Scale study (docs/results.md): Fashion-MNIST, small BatchNorm CNN, test accuracy vs number of
# ranks (virtual ranks: DDP's semantics in one process), per-rank batch fixed at 8, LR scaled
# linearly with the global batch (train.reference_batch). One compare per (partition, ranks).
# Usage: studies/scale.sh [SEEDS] [RANKS...]     (defaults: 1 seed, 4 16 64 256)
# Then:  .venv/bin/python studies/scale_table.py runs/scale   -> table + plot
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-1}; shift || true
ranks=("${@:-4 16 64 256}")
read -r -a ranks <<< "${ranks[*]}"
for partition in label-sorted random; do
  for m in "${ranks[@]}"; do
    .venv/bin/reshuffle compare configs/fashion-mnist.yaml \
      shuffle.partition=$partition data.train_limit=12000 train.batch_size=8 train.epochs=6 \
      log.dir=runs/scale name=$partition-$m log.tensorboard=false log.every_steps=0 \
      train.checkpoint_every=0 \
      --strategies global local partial:0.1 partial:0.01 local+model.norm=sync-batch \
      --seeds "$seeds" --virtual-ranks "$m"
  done
done
