"""Score a written segmentation against its BraTS case with the training pipeline's test metrics.

    .venv/bin/python Training/scripts/score_segmentation.py OUT/<case>_seg.nii.gz CASE_FOLDER [...]

Takes pairs (prediction, case folder), e.g. the ``_seg.nii.gz`` that ``kantumorseg segment`` wrote,
and prints per case the 3D Dice (WT/TC/ET), the mean slice Dice over the tumour slices and the
false-positive mL on the tumour-free brain slices, then the same pooled over the cases: the
definitions of ``Training.train.evaluate_test_cases``, so a CPU run of the real command can be
checked against the figures the GPU wrote into results.json and the model card.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from Training.data import read_nifti_case, voxel_ml
from Training.metrics import brain_slices, mean_metrics, score_test_case


def score(prediction: Path, case_dir: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """One case: its figures, and its tumour slices (prediction, truth) for the pooled mean."""
    volume, truth = read_nifti_case(case_dir)
    pred = np.asarray(nib.load(str(prediction)).dataobj).astype(np.uint8)
    if pred.shape != truth.shape:
        raise SystemExit(f"{prediction} has shape {pred.shape}, its case {truth.shape}.")
    return score_test_case(pred, truth, brain_slices(volume), voxel_ml(case_dir))


def main(argv: list[str]) -> None:
    if len(argv) < 2 or len(argv) % 2:
        raise SystemExit(__doc__)
    cases, slice_preds, slice_truths = {}, [], []
    for prediction, case_dir in zip(argv[::2], argv[1::2]):
        figures, preds, truths = score(Path(prediction), Path(case_dir))
        cases[Path(prediction).name.split("_seg")[0]] = figures
        slice_preds.append(preds)
        slice_truths.append(truths)
    summary = {
        "cases": cases,
        "slices": mean_metrics(np.concatenate(slice_preds), np.concatenate(slice_truths)),
        "volume_3d_mean_dice": float(np.mean([c["volume_3d"]["dice_mean"] for c in cases.values()])),
        "false_positive_ml_total": float(sum(c["false_positive_ml_tumour_free_slices"] for c in cases.values())),
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
