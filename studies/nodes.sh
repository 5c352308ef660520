#!/usr/bin/env bash
# Node-aware shuffling study (docs/results.md section 4): Fashion-MNIST, small BatchNorm CNN,
# virtual ranks (DDP's semantics in one process), per-rank batch 8, LR scaled with the global batch.
# Per number of ranks (64, 256, 1,024), on label-sorted initial partitions: global, local (per
# rank), local + SyncBatchNorm over all ranks; for nodes of 4 and of 8 ranks: node-local,
# node-local + partial 0.1 between nodes, local + SyncBatchNorm within the node, node-local +
# SyncBatchNorm within the node. On random partitions: global, local, node-local (4 and 8).
# Then a probe for random partitions at scale: a 100-class synthetic set at 1,024 ranks (about
# 0.2 samples per class per rank), global vs local.
# Usage: studies/nodes.sh [SEEDS] [RANKS...]   (defaults: 3 seeds; 64 256 1024)
# Then:  .venv/bin/python studies/nodes_table.py runs/nodes --plot docs/img/nodes-frontier.png
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-3}; shift || true
ranks=("${@:-64 256 1024}")
read -r -a ranks <<< "${ranks[*]}"
common=(data.train_limit=24000 data.test_limit=5000 train.batch_size=8 train.epochs=4 log.dir=runs/nodes
        log.tensorboard=false log.every_steps=0 train.checkpoint_every=0 dist.virtual_batch_limit=512)
sync=model.norm=sync-batch
node=shuffle.level=node
for m in "${ranks[@]}"; do
  .venv/bin/reshuffle compare configs/fashion-mnist.yaml shuffle.partition=label-sorted "${common[@]}" \
    name=label-sorted-$m --seeds "$seeds" --virtual-ranks "$m" --strategies global local local+$sync+dist.virtual_batch_limit=8192
  .venv/bin/reshuffle compare configs/fashion-mnist.yaml shuffle.partition=random "${common[@]}" \
    name=random-$m --seeds "$seeds" --virtual-ranks "$m" --strategies global local
  for r in 4 8; do
    .venv/bin/reshuffle compare configs/fashion-mnist.yaml shuffle.partition=label-sorted "${common[@]}" \
      name=label-sorted-$m-r$r dist.ranks_per_node=$r --seeds "$seeds" --virtual-ranks "$m" \
      --strategies local+$node partial:0.1+$node local+$sync+model.sync_group=node \
        local+$node+$sync+model.sync_group=node
    .venv/bin/reshuffle compare configs/fashion-mnist.yaml shuffle.partition=random "${common[@]}" \
      name=random-$m-r$r dist.ranks_per_node=$r --seeds "$seeds" --virtual-ranks "$m" --strategies local+$node
  done
done
.venv/bin/reshuffle compare configs/fashion-mnist.yaml data.name=synthetic data.synthetic.num_classes=100 \
  data.synthetic.num_samples=24000 data.synthetic.test_samples=5000 "${common[@]}" shuffle.partition=random \
  name=classes100-random-1024 --seeds "$seeds" --virtual-ranks 1024 --strategies global local
