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

from KANTumorSegLib.preprocessing import brain_mask
from Training.data import find_case_files, read_nifti_case
from Training.metrics import case_metrics, mean_metrics


def score(prediction: Path, case_dir: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """One case: its figures, and its tumour slices (prediction, truth) for the pooled mean."""
    volume, truth = read_nifti_case(case_dir)
    pred = np.asarray(nib.load(str(prediction)).dataobj).astype(np.uint8)
    if pred.shape != truth.shape:
        raise SystemExit(f"{prediction} has shape {pred.shape}, its case {truth.shape}.")
    voxel_ml = float(np.prod(nib.load(str(find_case_files(case_dir)[0]["seg"])).header.get_zooms()[:3])) / 1000.0
    tumour = [z for z in range(truth.shape[-1]) if truth[..., z].any()]
    empty_brain = [z for z in range(truth.shape[-1]) if not truth[..., z].any() and brain_mask(volume[..., z]).any()]
    preds, truths = np.moveaxis(pred[..., tumour], -1, 0), np.moveaxis(truth[..., tumour], -1, 0)
    figures = {
        "volume_3d": case_metrics(pred, truth),
        "tumour_slices": mean_metrics(preds, truths),
        "n_tumour_slices": len(tumour),
        "n_tumour_free_brain_slices": len(empty_brain),
        "false_positive_ml_tumour_free_slices": int((pred[..., empty_brain] > 0).sum()) * voxel_ml,
    }
    return figures, preds, truths


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
