#!/bin/bash
# Round 3, device call 2 (nvidia-h200-x2): (1) the DistributedDataParallel speed-up: the same run
# (global batch 16) on 1 GPU and on 2 GPUs through torchrun; (2) the experiment grid (grid3.yaml:
# the study's recipe for 100 epochs; the 9 core cells and the basis and grid-count ablations)
# spread over both GPUs, every run at once, under a deadline.
# The recorded call (Training/experiments/h200_round3, commit 6decd6f) also tested a CUDA-graph
# step first and fell back to eager steps when that test failed; the graph step has been removed
# (docs/RESULTS.md, round 3), so this runs the eager steps the recorded runs used.
set -u
OUT=${OUT:-out}
START=$(date +%s)
mkdir -p "$OUT"
nvidia-smi -L

SPEED=(--config Training/configs/default.yaml --override data.root=.device/brats_samples --override output=runs/speed
       --override data.pool=all --override data.n_val=25 --override model.head=regions --override train.lr=1.0e-3
       --override train.epochs=${SPEED_EPOCHS:-8} --override train.test=false --override train.progress=false
       --override train.checkpoint_every=100 --override train.dice_batch=true)
python3 -m Training train "${SPEED[@]}" --override name=gpu1_eager_b16 --override train.batch_size=16
torchrun --standalone --nproc_per_node=2 -m Training train "${SPEED[@]}" --override name=gpu2_ddp_b16 \
  --override train.batch_size=8 2>&1 | grep -v "^W\|OMP_NUM_THREADS\|\*\*\*\*"
echo "speed runs done at $(( $(date +%s) - START )) s"

DEADLINE=$(( START + ${BUDGET_S:-480} ))
CELLS=kan_n150,kan_n100,kan_n50,plain_n150,plain_n100,plain_n50,basicunet_n150,basicunet_n100,basicunet_n50,kan_cheb_n100,kan_g2_n100,kan_g8_n100
python3 -m Training grid --config Training/configs/grid3.yaml --jobs ${JOBS:-36} --gpus 2 --only $CELLS \
  --override data.root=.device/brats_samples --override train.deadline_unix=$DEADLINE 2>&1 | tee runs_grid3.log
tar czf "$OUT/results_round3_grid.tgz" --exclude='*.pt' runs runs_grid3.log
ls -la "$OUT"; echo "all done at $(( $(date +%s) - START )) s"
