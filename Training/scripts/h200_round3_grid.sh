#!/bin/bash
# Round 3, device call 2 (nvidia-h200-x2): the experiment grid (grid3.yaml, the study's recipe
# for 100 epochs) spread over both GPUs, the training step replayed as a CUDA graph.
set -u
OUT=${OUT:-out}
START=$(date +%s)
mkdir -p "$OUT"
nvidia-smi -L
DEADLINE=$(( START + ${BUDGET_S:-480} ))
python3 -m Training grid --config Training/configs/grid3.yaml --jobs ${JOBS:-24} --gpus 2 \
  --override data.root=.device/brats_samples --override train.deadline_unix=$DEADLINE 2>&1 | tee runs_grid3.log
tar czf "$OUT/results_round3_grid.tgz" --exclude='*.pt' runs runs_grid3.log
ls -la "$OUT"; echo "all done at $(( $(date +%s) - START )) s"
