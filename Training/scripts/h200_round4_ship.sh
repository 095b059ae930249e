#!/bin/bash
# Round 4, device call 1 (nvidia-h200-x2): the shipped-model candidates of ship4.yaml, two per
# GPU, under a deadline; the two with the best validation mean Dice are exported (float32, or
# float16 where float32 would pass 20 MB) for
# the choice at home. Run from the repository root with the slice cache in .cache/slices, the
# test cases in .device/brats_samples and the wheels installed on PYTHONPATH.
set -u
OUT=${OUT:-out}
START=$(date +%s)
mkdir -p "$OUT" export
nvidia-smi -L
DEADLINE=$(( START + ${BUDGET_S:-540} ))
python3 -m Training grid --config Training/configs/ship4.yaml --jobs 4 --gpus 2 --override data.root=.device/brats_samples \
  --override train.deadline_unix=$DEADLINE 2>&1 | tee runs_ship4.log
echo "candidates done at $(( $(date +%s) - START )) s"
python3 - <<'PY' > export_list.txt
import glob, json
runs = sorted(((json.load(open(f))["validation"]["dice_mean"], f.rsplit("/", 1)[0]) for f in glob.glob("runs/ship4/*/results.json")), reverse=True)
for value, run in runs:
    print(f"{value:.4f} {run}", flush=True)
PY
cat export_list.txt
head -2 export_list.txt | while read -r value run; do
  name=$(basename "$run")
  python3 -m Training export "$run" -o "export/$name.safetensors" && tar czf "$OUT/$name.tgz" -C export "$name.safetensors" "$name.json"
done
tar czf "$OUT/results_round4_ship.tgz" --exclude='*.pt' runs/ship4 runs_ship4.log export_list.txt
ls -la "$OUT"; echo "all done at $(( $(date +%s) - START )) s"
