#!/bin/bash
# Round 5 on an nvidia-h200-x2, two device calls on one warm machine (docs/RESULTS.md, round 5):
#   bash Training/scripts/h200_round5.sh ship   the ship5.yaml seeds, two per GPU, all exported
#   bash Training/scripts/h200_round5.sh grid   the grid-count and basis ablations at n = 100 and
#                                              KAN at n = 50, from scratch to the study's 100 epochs
# Run from the repository root with the slice cache in .cache/slices, the test cases in
# .device/brats_samples and the wheels installed on PYTHONPATH. Results land in $OUT.
set -u
MODE=${1:?usage: h200_round5.sh ship|grid}
OUT=${OUT:-out}
START=$(date +%s)
DEADLINE=$(( START + ${BUDGET_S:-540} ))
mkdir -p "$OUT"
nvidia-smi -L
case "$MODE" in
  ship)
    python3 -m Training grid --config Training/configs/ship5.yaml --jobs 4 --gpus 2 \
      --override data.root=.device/brats_samples --override train.deadline_unix=$DEADLINE 2>&1 | tee runs_ship5.log
    mkdir -p export
    for run in runs/ship5/*/; do
      name=$(basename "$run")
      python3 -m Training export "$run" -o "export/$name.safetensors" && tar czf "$OUT/$name.tgz" -C export "$name.safetensors" "$name.json"
    done
    tar czf "$OUT/results_round5_ship.tgz" --exclude='*.pt' runs/ship5 runs_ship5.log ;;
  grid)
    python3 -m Training grid --config Training/configs/grid3.yaml --jobs 12 --gpus 2 \
      --only kan_g8_n100,kan_cheb_n100,kan_g2_n100,kan_n50 --override data.root=.device/brats_samples \
      --override output=runs/grid5 --override train.deadline_unix=$DEADLINE 2>&1 | tee runs_grid5.log
    tar czf "$OUT/results_round5_grid.tgz" --exclude='*.pt' runs/grid5 runs_grid5.log ;;
  *) echo "unknown mode $MODE: use ship or grid" >&2; exit 2 ;;
esac
ls -la "$OUT"; echo "all done at $(( $(date +%s) - START )) s"
