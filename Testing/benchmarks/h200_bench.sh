#!/usr/bin/env bash
# Issue 5's GPU run (docs/PERFORMANCE.md, "GPU"): every row of benchmark.py on one H200, in one
# device call of about 3 minutes, run from the repository root with carry [".device/bench"]:
#   whl/         monai, pynrrd, slicerio wheels (py3-none-any; the image lacks them)
#   sitk.tar.xz  the unpacked SimpleITK 2.5.7 wheel (abi3): xz halves it, so the tree plus the
#                carry stays under the 64 MiB limit where the 53 MB wheel did not
#   case/        BraTS20_Training_001's five .nii.gz (benchmark.py's fallback when the samples
#                folder is absent)
# .device/ is ignored through .git/info/exclude: no data or wheel is ever committed.
# When .device/brats_samples is carried instead of case/, it is used, and the accuracy
# check covers its three cases.
# Writes under $OUT (5 files): env.txt, gpu.log, gpu.json, and the shipped model's overview
# PNG and volumes JSON from the timed `kantumorseg segment` run.
set -uo pipefail
OUT=${OUT:-/tmp/kts-h200-out}
BENCH=.device/bench
SITE=/tmp/site
mkdir -p "$OUT" "$SITE"

# The missing packages, into a private folder (nothing can be fetched on the device).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$BENCH"/whl/*.whl && tar xJf "$BENCH/sitk.tar.xz" -C "$SITE" || { echo "install failed" | tee "$OUT/env.txt"; exit 1; }
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1

cases=BraTS20_Training_001
if [ -d .device/brats_samples ]; then
    export KANTUMORSEG_SAMPLES="$PWD/.device/brats_samples"
    cases="BraTS20_Training_001 Brats18_2013_2_1 BraTS2021_00000"
fi

{
    nvidia-smi -L
    python3 -c "import torch, SimpleITK, monai, slicerio; print('python', __import__('sys').version.split()[0],
'torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(),
torch.cuda.get_device_name(), 'SimpleITK', SimpleITK.Version_VersionString(), 'monai', monai.__version__)"
    nproc
} 2>&1 | tee "$OUT/env.txt"

# Widths 8 and the shipped 16 (its row is the trained model), the first version's model beside
# each (--before), plain U-Nets, BasicUNet, SegResNet, the whole command warm and cold, the 4 GiB
# GPU check, the accuracy check of the trained width only (a random network's near-tied logits
# flip under TF32 alone: G1's random w8 failed it in float32 too), then training through Training's step at
# batch 32 in bf16 (last, so an out-of-memory step there spoils nothing else).
# timeout: the log and JSON come back even if a step hangs.
timeout 420 python3 Testing/benchmarks/benchmark.py --device cuda --batch 64 --widths 8 16 --before 8 16 \
    --model Resources/Models/kanunet2d_brats.safetensors --repeats 3 --warmup 1 \
    --train-batch 32 --train-steps 20 --small-gpu 4 --accuracy-widths 16 --accuracy-cases $cases \
    --work /tmp/kb --json "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu.log"
status=${PIPESTATUS[0]}

cp /tmp/kb/KANU-Net_w16_trained/BraTS20_Training_001_overview.png \
    /tmp/kb/KANU-Net_w16_trained/BraTS20_Training_001_volumes.json "$OUT/" 2>/dev/null
exit "$status"
