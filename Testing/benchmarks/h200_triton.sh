#!/usr/bin/env bash
# Issue 5, round 5 (docs/PERFORMANCE.md, run G7): the fused Triton expansion on one H200, in one
# device call with carry [".device/bench"] (see h200_bench.sh for what that folder holds).
#   1. model_levers.py: eager against Triton in float32 and bf16, the plain U-Net in both.
#   2. profile_model.py in float32 (the bf16 profile is run G6's).
#   3. The real command in fresh processes on BraTS20_Training_001: Triton with an empty kernel
#      cache (a first run on a new machine compiles the kernels), Triton again (cached), and
#      the eager expansion. (Run G7 ran this while Triton was the default on CUDA and
#      KANTUMORSEG_TRITON=0 turned it off; since G7 it is opt-in, so the Triton rows set =1.)
# Writes $OUT/levers.log, $OUT/profile_fp32.log and $OUT/fresh.log.
set -uo pipefail
OUT=${OUT:-/tmp/kts-h200-out}
SITE=/tmp/site
mkdir -p "$OUT" "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .device/bench/whl/*.whl && tar xJf .device/bench/sitk.tar.xz -C "$SITE" || { echo "install failed"; exit 1; }
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
timeout 200 python3 Testing/benchmarks/model_levers.py > "$OUT/levers.log" 2>&1
timeout 90 python3 Testing/benchmarks/profile_model.py --device cuda > "$OUT/profile_fp32.log" 2>&1
fresh() {  # label, then environment assignments for the one command
    local label=$1; shift
    rm -rf /tmp/fresh && local start=$EPOCHREALTIME
    env "$@" python3 -m KANTumorSegLib segment .device/bench/case -o /tmp/fresh --device cuda > /tmp/fresh.out 2>&1
    local status=$? end=$EPOCHREALTIME
    awk -v l="$label" -v s="$start" -v e="$end" -v x="$status" 'BEGIN { printf "| %s | %.2f | %s |\n", l, e - s, x }'
}
rm -rf /tmp/triton_empty  # the first Triton row compiles, even when this runs again on a warm machine
{
    echo "| fresh process, BraTS20_Training_001 | seconds | exit |"; echo "|---|---|---|"
    fresh "Triton, empty kernel cache" KANTUMORSEG_TRITON=1 TRITON_CACHE_DIR=/tmp/triton_empty
    fresh "Triton, cached kernels" KANTUMORSEG_TRITON=1 TRITON_CACHE_DIR=/tmp/triton_empty
    fresh "Triton, cached kernels (again)" KANTUMORSEG_TRITON=1 TRITON_CACHE_DIR=/tmp/triton_empty
    fresh "eager expansion" KANTUMORSEG_TRITON=0
    fresh "eager expansion (again)" KANTUMORSEG_TRITON=0
    tail -3 /tmp/fresh.out
} > "$OUT/fresh.log" 2>&1
cat "$OUT/levers.log" "$OUT/fresh.log"; grep -A9 "^| category" "$OUT/profile_fp32.log"
