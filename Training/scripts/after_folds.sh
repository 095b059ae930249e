#!/bin/bash
# After the folds call (Training/configs/folds.yaml): every CPU step that turns its exported models
# into the decision and the figures, in order. Models in $1 (default runs/export, as
# `cat models.tgz.part-* | tar xz -C runs` leaves them), figures in $2 (default runs/after_folds).
#   bash Training/scripts/after_folds.sh [MODELS] [OUT]
# 1. out-of-fold validation: each fold's model on the 4 patients it held out, post-processing chosen
#    on all 12 (evaluate_model.py --oof); fold0 alone against the shipped model's 0.810 (the rule);
# 2. the per-slice control on fold0's patients;
# 3. test figures of fold0 and of final seed 0 (raw and with the chosen post-processing);
# 4. conformal ranges fitted on the 12 out-of-fold patients for final seed 0 (CV+), coverage by
#    leave-one-patient-out and on the test patients;
# 5. error detection with final seed 1 as a --confidence member on the test patients.
# Then apply folds.yaml's rule by hand, copy the chosen model into Resources/Models with its card,
# and fit the Platt scaling (confidence_eval.py --calibration on out-of-fold patients).
set -euo pipefail
M=${1:-runs/export}
OUT=${2:-runs/after_folds}
PY=${PY:-.venv/bin/python}
F0=BraTS2021_00005,BraTS2021_00024,BraTS2021_01477,BraTS2021_01481
F1=Brats18_2013_2_1,BraTS2021_00002,BraTS2021_01482,BraTS2021_01484
F2=BraTS2021_00003,BraTS2021_00006,BraTS2021_01478,BraTS-GLI-00012-000
mkdir -p "$OUT"
EVAL="$PY Training/scripts/evaluate_model.py --cache .cache/predictions"
$EVAL --cases val --oof "$M/fold0_vol_g2_s0.safetensors:$F0" --oof "$M/fold1_vol_g2_s0.safetensors:$F1" \
    --oof "$M/fold2_vol_g2_s0.safetensors:$F2" -o "$OUT/oof.json" | tee "$OUT/oof.log"
$EVAL --cases val --oof "$M/fold0_vol_g2_s0.safetensors:$F0" -o "$OUT/fold0_val.json" | tee "$OUT/fold0_val.log"
$EVAL --cases val --oof "$M/fold0_slice_g2_s0.safetensors:$F0" -o "$OUT/fold0_slice_val.json" | tee "$OUT/fold0_slice_val.log"
POST=$($PY -c "import json; c = json.load(open('$OUT/oof.json'))['chosen']; print(f\"{c['min_component_ml']},{c['et_min_ml']}\")")
for run in fold0_vol_g2_s0 fold0_slice_g2_s0 final_vol_g2_s0; do
    $EVAL "$M/$run.safetensors" --cases test --post "$POST" -o "$OUT/${run}_test.json" | tee "$OUT/${run}_test.log"
done
$PY Testing/benchmarks/volume_coverage.py --out "$OUT" --oof "$M/fold0_vol_g2_s0.safetensors:$F0" \
    --oof "$M/fold1_vol_g2_s0.safetensors:$F1" --oof "$M/fold2_vol_g2_s0.safetensors:$F2" \
    --model "$M/final_vol_g2_s0.safetensors" --eps-sweep | tail -n 40
$PY Testing/benchmarks/confidence_eval.py --out "$OUT/confidence" --model "$M/final_vol_g2_s0.safetensors" \
    --members "$M/final_vol_g2_s1.safetensors" --cache .cache/confidence --cost-cases BraTS20_Training_001 --threads 2
