#!/bin/bash
# Shipped-model candidates alone on the GPU under a shared deadline, then exported.
set -u
OUT=${OUT:-out}
GRID=${GRID:-Training/configs/ship2.yaml}
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-130} ))
python3 -m Training grid --config "$GRID" --jobs 4 --override data.root=.device/brats_samples \
  --override train.deadline_unix=$DEADLINE --override train.checkpoint_every=10 2>&1 | tee runs_ship2.log
mkdir -p "$OUT"
tar czf "$OUT/results2.tgz" --exclude='*.pt' runs runs_ship2.log
for run in runs/ship2/*_s0; do
  name=$(basename "$run" _s0)
  python3 -m Training export "$run" -o "export/$name.safetensors" && tar czf "$OUT/$name.tgz" -C export "$name.safetensors" "$name.json"
done
ls -la "$OUT"
