#!/usr/bin/env bash
# GPU checks (the test suite is CPU-only): NCCL process group, store mode with the exchange on
# GPU buffers, AMP fp16/bf16, channels_last, torch.compile, SyncBatchNorm, virtual ranks on the
# GPU (1,024 ranks), a Fashion-MNIST epoch, and 4 ranks on a 1-GPU machine (auto -> gloo).
# Needs Fashion-MNIST where configs/system.yaml looks. Usage: studies/gpu_check.sh [RUN_DIR]
set -u
cd "$(dirname "$0")/.."
R=${1:-runs/gpu-check}
rc_all=0
step() {
  echo; echo "=== $*"; local t=$SECONDS
  "$@" 2>&1 | grep -v "it/s\]\|step [0-9]*/[0-9]* loss\|return func\|UserWarning" | tail -6
  local rc=${PIPESTATUS[0]}; echo "=== rc=$rc $((SECONDS - t))s"; [[ $rc == 0 ]] || rc_all=1
}
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version())"
smoke=(configs/smoke.yaml log.dir="$R" log.progress=lines)
step reshuffle run "${smoke[@]}" name=nccl-store shuffle.mode=store shuffle.fraction=0.25 train.epochs=3
step reshuffle verify "$R/nccl-store/store"
step python3 -c "import json; e = json.load(open('$R/nccl-store/env.json')); print(e['backend'], e['device'])"
step reshuffle run "${smoke[@]}" name=amp-fp16 train.amp=fp16 train.channels_last=true
step reshuffle run "${smoke[@]}" name=bf16-compile train.amp=bf16 train.compile=true
step reshuffle run "${smoke[@]}" name=sync-batch model.norm=sync-batch
step reshuffle run "${smoke[@]}" name=virtual-dropout --virtual-ranks 4 model.dropout=0.3
step reshuffle run "${smoke[@]}" name=virtual-sync-bf16 --virtual-ranks 4 model.norm=sync-batch train.amp=bf16
fm=(configs/fashion-mnist.yaml log.dir="$R" log.progress=lines log.tensorboard=false)
step reshuffle run "${fm[@]}" name=fm-1gpu train.batch_size=256 train.epochs=2
step reshuffle run "${fm[@]}" name=fm-virtual-1024 --virtual-ranks 1024 train.batch_size=8 train.epochs=1
step reshuffle run "${fm[@]}" name=fm-4ranks dist.nproc=4 dist.place=processes train.epochs=1 data.train_limit=8000
step reshuffle run "${fm[@]}" name=fm-default train.epochs=1   # 4 ranks, 1 GPU: placed as virtual ranks on it
step python3 -c "import json; e = json.load(open('$R/fm-default/env.json')); print(e['device'], e.get('virtual_ranks'))"
step python3 -c "import json; e = json.load(open('$R/fm-4ranks/env.json')); print(e['backend'], e['world_size'])"
echo; [[ $rc_all == 0 ]] && echo "gpu check: all passed" || echo "gpu check: FAILED (see the rc lines)"
exit $rc_all
