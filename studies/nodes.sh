#!/usr/bin/env bash
# Node-aware shuffling study (docs/results.md section 4): Fashion-MNIST (24,000 images), small
# BatchNorm CNN, virtual ranks (DDP's semantics in one process), 4 epochs, LR scaled linearly with
# the global batch. Per-rank batch 8, or 2 at 1,024 ranks (a global batch of 2,048 at most: at
# 8,192 every configuration stays at chance in 4 epochs of 3 steps).
# Per number of ranks, on label-sorted initial partitions: global, local (per rank), local +
# SyncBatchNorm over all ranks; for nodes of R ranks: node-local, node-local + partial 0.1
# between nodes, local + SyncBatchNorm within the node, node-local + SyncBatchNorm within the node.
# On random partitions: global, local, node-local.
# Usage: [NODES="4 8"] studies/nodes.sh [SEEDS] [RANKS...]   (defaults: 3 seeds; 64 1024)
#        studies/nodes.sh probe [SEEDS]   random partitions of a 100-class synthetic set at 256 ranks
#                                         (about one sample per class per rank): global vs local
# Then:  .venv/bin/python studies/nodes_table.py runs/nodes --plot docs/img/nodes-frontier.png
set -euo pipefail
cd "$(dirname "$0")/.."
common=(data.train_limit=24000 data.test_limit=5000 train.epochs=4 log.dir=runs/nodes log.tensorboard=false
        log.every_steps=0 train.checkpoint_every=0 dist.virtual_batch_limit=512)
if [[ "${1:-}" == probe ]]; then
  .venv/bin/reshuffle compare configs/fashion-mnist.yaml data.name=synthetic data.synthetic.num_classes=100 \
    data.synthetic.noise=0.5 data.synthetic.num_samples=24000 data.synthetic.test_samples=5000 \
    "${common[@]}" train.batch_size=8 shuffle.partition=random name=classes100-random-256 \
    --seeds "${2:-3}" --virtual-ranks 256 --strategies global local
  exit
fi
seeds=${1:-3}; shift || true
ranks=("${@:-64 1024}")
read -r -a ranks <<< "${ranks[*]}"
read -r -a nodes <<< "${NODES:-4 8}"
sync=model.norm=sync-batch
node=shuffle.level=node
for m in "${ranks[@]}"; do
  batch=$(( m > 256 ? 2048 / m : 8 ))
  run=(configs/fashion-mnist.yaml "${common[@]}" train.batch_size=$batch)
  on=(--seeds "$seeds" --virtual-ranks "$m")
  # SyncBatchNorm over all ranks forwards every rank at once: a larger virtual_batch_limit
  .venv/bin/reshuffle compare "${run[@]}" shuffle.partition=label-sorted name=label-sorted-$m "${on[@]}" \
    --strategies global local local+$sync+dist.virtual_batch_limit=8192
  .venv/bin/reshuffle compare "${run[@]}" shuffle.partition=random name=random-$m "${on[@]}" \
    --strategies global local
  for r in "${nodes[@]}"; do
    .venv/bin/reshuffle compare "${run[@]}" shuffle.partition=label-sorted name=label-sorted-$m-r$r \
      dist.ranks_per_node=$r "${on[@]}" --strategies local+$node partial:0.1+$node \
        local+$sync+model.sync_group=node local+$node+$sync+model.sync_group=node
    .venv/bin/reshuffle compare "${run[@]}" shuffle.partition=random name=random-$m-r$r \
      dist.ranks_per_node=$r "${on[@]}" --strategies local+$node
  done
done
