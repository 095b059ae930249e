#!/bin/bash
# The shipped model's final round in one device call: two candidates side by side on one GPU
# under a shared deadline, each then exported; results and exports come back through $OUT.
set -u
OUT=${OUT:-out}
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-330} ))
nvidia-smi -L
python3 -m Training grid --config Training/configs/ship_final.yaml --jobs 2 --override data.root=.device/brats_samples \
  --override train.deadline_unix=$DEADLINE 2>&1 | tee runs_final.log
mkdir -p "$OUT"
for run in runs/final/*_s0; do
  name=$(basename "$run" _s0)
  python3 -m Training export "$run" -o "export/$name.safetensors" && tar czf "$OUT/$name.tgz" -C export "$name.safetensors" "$name.json"
done
tar czf "$OUT/results_final.tgz" --exclude='*.pt' runs/final runs_final.log
ls -la "$OUT"
