#!/bin/bash
# Round 4, device call 2 (nvidia-h200-x2): the cells of grid3.yaml that round 3 left short of the
# study's 100 epochs (KAN at n = 100 and 150, 32-49 epochs; plain and BasicUNet at n = 100 and
# 150, 40-83) plus the batch-Dice ablation it never ran, 21 runs at once on both GPUs from
# scratch (round 3's checkpoints stayed on its machine). The grid-count and basis ablations
# (kan_g2/g8/cheb_n100) keep round 3's 32-49 epochs. Same seeds and recipe as round 3.
set -u
OUT=${OUT:-out}
START=$(date +%s)
mkdir -p "$OUT"
nvidia-smi -L
DEADLINE=$(( START + ${BUDGET_S:-545} ))
CELLS=kan_n150,kan_n100,kan_dicebatch_n100,basicunet_n150,plain_n150,basicunet_n100,plain_n100
python3 -m Training grid --config Training/configs/grid3.yaml --jobs 21 --gpus 2 --only $CELLS \
  --override data.root=.device/brats_samples --override output=runs/grid4 --override train.deadline_unix=$DEADLINE 2>&1 \
  | tee runs_grid4.log
tar czf "$OUT/results_round4_grid.tgz" --exclude='*.pt' runs/grid4 runs_grid4.log
ls -la "$OUT"; echo "all done at $(( $(date +%s) - START )) s"
