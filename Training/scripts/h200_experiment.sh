#!/bin/bash
# The whole experiment in one device call (one H200, at most 600 s): the grid and the
# shipped-model candidates as parallel processes on the one GPU, under a shared deadline.
# Run from the repository root with the slice cache in .cache/slices and the two test
# cases under .device/brats_samples (see docs/RESULTS.md).
set -u
OUT=${OUT:-out}
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-430} ))
COMMON=(--override data.root=.device/brats_samples --override train.deadline_unix=$DEADLINE --override train.checkpoint_every=10)
nvidia-smi -L
python3 -m Training grid --config Training/configs/ship.yaml --jobs 4 "${COMMON[@]}" > runs_ship.log 2>&1 &
python3 -m Training grid --config Training/configs/grid.yaml --jobs 42 "${COMMON[@]}" --override train.epochs=${GRID_EPOCHS:-30} 2>&1 | tee runs_grid.log
wait
cat runs_ship.log
mkdir -p "$OUT"
tar czf "$OUT/results.tgz" --exclude='*.pt' runs runs_grid.log runs_ship.log
for run in runs/ship/*_s0; do
  name=$(basename "$run" _s0)
  python3 -m Training export "$run" -o "export/$name.safetensors" && tar czf "$OUT/$name.tgz" -C export "$name.safetensors" "$name.json"
done
ls -la "$OUT"
