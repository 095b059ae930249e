#!/bin/bash
# Runs experiment grids on one GPU machine under a shared wall-clock budget, then packs the
# run folders (without checkpoints) and every run's exported weights into $OUT.
#   bash Training/scripts/device_run.sh --stage         # copy the carried .stage/part*/ into the cache
#   BUDGET_S=600 [DETACH=1] bash Training/scripts/device_run.sh GRID.yaml:JOBS [GRID.yaml:JOBS ...]
#   bash Training/scripts/device_run.sh --wait          # (after DETACH=1) wait, then pack
# Each grid runs as its own driver with JOBS processes at a time, all grids side by side.
# Data: `python -m Training cache --ranges slice,volume --stage .stage` builds the 8-bit cache here
# and splits its training files into .stage/part1, part2, ... of at most 40 MB: with the 18 MB tree
# and the MONAI wheel each part fits one device call (64 MiB). Call with --stage, carrying one part
# at a time, while the machine stays warm (30 s idle; ignored files stay between calls), then start
# the grids. Test figures are computed afterwards here, on the CPU, through the library
# (Training/scripts/evaluate_model.py), so no test file travels.
# MONAI is not on the machine: carry .whl (python3 -m pip download monai, see docs/training.md) and
# start each call with the pip install line of the device tool's README.
# With DETACH=1 it starts itself in a new process session and returns (the device tool keeps such
# a process while the machine stays warm); --wait then waits for it (WAIT_S, default 560 s) and
# packs what is there: results.tgz and the exported models in parts of at most 15 MB
# (models.tgz.part-aa, -ab, ...; `cat models.tgz.part-* | tar xz` joins them). A call brings back
# at most 64 MiB, so it carries the first three parts; `--fetch 3` (then 6, ...) brings the rest.
set -u
OUT=${OUT:-out}
# Under runs/ (ignored by git): a device call removes the untracked files that git does not ignore.
STATE=runs/.device_state
CACHE=.cache/slices_q8
pack() {
  mkdir -p runs/export runs/packed
  # EXPORT_FROM names the grids' output folders whose runs are exported (default all): a grid of
  # many small runs scored on the device brings back its figures, not its weights.
  for run in runs/${EXPORT_FROM:-*}/*/; do
    name=$(basename "$run")
    [ -f "$run/best.pt" ] && [ ! -f "runs/export/$name.safetensors" ] && \
      python3 -m Training export "$run" -o "runs/export/$name.safetensors" >/dev/null 2>&1
  done
  tar czf "$OUT/results.tgz" --exclude="*.pt" --exclude=runs/export --exclude=runs/packed runs 2>/dev/null
  rm -f runs/packed/models.tgz.part-*
  ls runs/export/*.safetensors >/dev/null 2>&1 && tar czf - -C runs export | split -b 15M - runs/packed/models.tgz.part-
  fetch 0
}
# Copies the packed model parts from number $1 on into $OUT, at most three (45 MB) a call.
fetch() {
  ls runs/packed/models.tgz.part-* 2>/dev/null | tail -n +$(( $1 + 1 )) | head -n 3 | xargs -r cp -t "$OUT"
  echo "parts: $(ls runs/packed | wc -l), in this call: $(ls "$OUT" | grep -c part-)"; ls -la "$OUT"
}
if [ "${1:-}" = "--fetch" ]; then mkdir -p "$OUT"; fetch "${2:-3}"; exit 0; fi
if [ "${1:-}" = "--stage" ]; then
  mkdir -p $CACHE && cp -v .stage/part*/*.npy.xz $CACHE/ | wc -l && ls $CACHE | wc -l && du -sh $CACHE
  exit 0
fi
if [ "${1:-}" = "--wait" ]; then
  for _ in $(seq 1 "${WAIT_S:-560}"); do [ -f $STATE/done ] && break; sleep 1; done
  tail -n 40 $STATE/driver.log
  if [ -f $STATE/done ]; then pack; echo "DONE"; else
    for log in runs/*/*/log.csv; do echo "$log: $(tail -n 1 "$log")"; done; echo "STILL RUNNING"; fi
  exit 0
fi
mkdir -p $STATE "$OUT"
if [ "${DETACH:-0}" = "1" ]; then
  rm -f $STATE/done
  DETACH=0 DETACHED=1 setsid nohup bash "$0" "$@" > $STATE/driver.log 2>&1 < /dev/null &
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
    ${EXTRA_OVERRIDE:+--override "$EXTRA_OVERRIDE"} ${ONLY:+--only "$ONLY"} > "$STATE/$(basename "$grid" .yaml).log" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
cat $STATE/*.log | grep -v "^\[" | tail -n 20
echo "all done at $(( $(date +%s) - START )) s"
# A detached run's $OUT belongs to the call that started it: --wait packs into its own.
[ "${DETACHED:-0}" = "1" ] || pack
touch $STATE/done
