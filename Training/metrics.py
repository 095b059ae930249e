"""Segmentation metrics with the BraTS rule for empty masks.

Dice of a region on one slice (or one volume) is 2|P & G| / (|P| + |G|), and 1 when both
prediction and ground truth are empty (BraTS). Set-level figures are means over slices.
"""

from __future__ import annotations

import numpy as np

from KANTumorSegLib.labels import CLASS_LABELS, region_mask

REGION_NAMES = ("WT", "TC", "ET")
CLASS_NAMES = {1: "NCR", 2: "ED", 4: "ET"}
METRIC_NAMES = ("accuracy", "dice_WT", "dice_TC", "dice_ET", "dice_mean", "dice_NCR", "dice_ED", "dice_ET_class")


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (BraTS)."""
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def case_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Every metric of one labelmap (0/1/2/4) against its ground truth, any shape."""
    out = {"accuracy": float((pred == truth).mean())}
    for region in REGION_NAMES:
        out[f"dice_{region}"] = dice(region_mask(pred, region), region_mask(truth, region))
    out["dice_mean"] = float(np.mean([out[f"dice_{r}"] for r in REGION_NAMES]))
    for label in CLASS_LABELS:
        name = "ET_class" if label == 4 else CLASS_NAMES[label]
        out[f"dice_{name}"] = dice(pred == label, truth == label)
    return out


def mean_metrics(preds: np.ndarray, truths: np.ndarray) -> dict[str, float]:
    """Slice-wise metrics of (N, H, W) labelmaps, averaged over the N slices."""
    per_slice = [case_metrics(p, t) for p, t in zip(preds, truths)]
    return {name: float(np.mean([m[name] for m in per_slice])) for name in METRIC_NAMES}


def per_slice_mean_dice(preds: np.ndarray, truths: np.ndarray) -> np.ndarray:
    """Mean Dice over WT/TC/ET of each slice: the paired samples of the KAN vs plain test."""
    return np.array([case_metrics(p, t)["dice_mean"] for p, t in zip(preds, truths)])


def brain_slices(volume: np.ndarray) -> np.ndarray:
    """One bool per axial slice of a (4, X, Y, Z) volume: does it hold brain (the library's mask)?"""
    from KANTumorSegLib.preprocessing import brain_mask

    return np.array([brain_mask(volume[..., z]).any() for z in range(volume.shape[-1])])


def score_test_case(pred: np.ndarray, truth: np.ndarray, brain_slices: np.ndarray, voxel_ml: float):
    """One 3D test case's figures: 3D metrics, slice metrics over its tumour slices and
    false-positive mL on its brain slices without tumour (``brain_slices``: one bool per
    axial slice); also returns those tumour slices (prediction, truth) as (N, X, Y) for a
    mean pooled over cases."""
    has_tumour = truth.any(axis=(0, 1))
    tumour = np.nonzero(has_tumour)[0]
    empty_brain = np.nonzero(~has_tumour & brain_slices)[0]
    preds, truths = np.moveaxis(pred[..., tumour], -1, 0), np.moveaxis(truth[..., tumour], -1, 0)
    figures = {
        "volume_3d": case_metrics(pred, truth),
        "tumour_slices": mean_metrics(preds, truths),
        "n_tumour_slices": len(tumour),
        "n_tumour_free_brain_slices": len(empty_brain),
        "false_positive_ml_tumour_free_slices": int((pred[..., empty_brain] > 0).sum()) * voxel_ml,
    }
    return figures, preds, truths
