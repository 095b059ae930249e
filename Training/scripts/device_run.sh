#!/bin/bash
# Runs experiment grids on one GPU machine under a shared wall-clock budget, then packs the
# run folders (without checkpoints) and each KANU-Net run's exported weights into $OUT.
#   BUDGET_S=1150 bash Training/scripts/device_run.sh GRID.yaml:JOBS [GRID.yaml:JOBS ...]
# Each grid runs as its own driver with JOBS processes at a time, all grids side by side.
# Expects the slice cache in .cache/slices_q8 and MONAI importable. `python -m Training cache
# --stage .stage` builds the cache here and splits it into .stage/train (39 MB) and .stage/test
# (28 MB); with the 18 MB tree each fits one device call (64 MiB), not both. Runs that score the
# test patients (train.test: true) need both on the machine: a first call carries .stage/test and
# copies it into .cache/slices_q8, and the next call, made within the 30 s the machine stays
# warm, carries .stage/train and runs this script. Runs with train.test: false need only
# .stage/train; their exported models are scored here with Training/scripts/evaluate_model.py.
# With DETACH=1 it starts itself in a new process session and returns (the device tool keeps
# such a process while the machine stays warm); `bash Training/scripts/device_run.sh --wait`
# then waits for it and packs what is there.
set -u
OUT=${OUT:-out}
STATE=.device_state
if [ "${1:-}" = "--wait" ]; then
  for _ in $(seq 1 "${WAIT_S:-560}"); do [ -f $STATE/done ] && break; sleep 1; done
  tail -n 40 $STATE/driver.log
  tar czf "$OUT/results.tgz" --exclude='*.pt' runs $STATE/driver.log 2>/dev/null
  ls export/*.safetensors >/dev/null 2>&1 && tar czf "$OUT/models.tgz" export
  ls -la "$OUT"; [ -f $STATE/done ] && echo "DONE" || echo "STILL RUNNING"
  exit 0
fi
mkdir -p $STATE "$OUT"
if [ "${DETACH:-0}" = "1" ]; then
  rm -f $STATE/done
  DETACH=0 setsid nohup bash "$0" "$@" > $STATE/driver.log 2>&1 < /dev/null &
  echo "started in the background"; exit 0
fi
START=$(date +%s)
DEADLINE=$(( START + ${BUDGET_S:-540} ))
nvidia-smi -L
pids=()
for spec in "$@"; do
  # One grid loads its data before the next starts (see grid.py).
  [ ${#pids[@]} -gt 0 ] && sleep 20
  grid=${spec%%:*}; jobs=${spec##*:}
  python3 -m Training grid --config "$grid" --jobs "$jobs" --override train.deadline_unix=$DEADLINE \
    > "$STATE/$(basename "$grid" .yaml).log" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
cat $STATE/*.log | grep -v "^\[" | tail -n 20
mkdir -p export
for run in runs/shipped/*/; do
  [ -f "$run/best.pt" ] && python3 -m Training export "$run" -o "export/$(basename "$run").safetensors" >/dev/null 2>&1
done
echo "all done at $(( $(date +%s) - START )) s"
touch $STATE/done
