"""Training metrics against cases computed by hand, empty masks (the BraTS rule) included."""

from __future__ import annotations

import numpy as np
import pytest

from Training.metrics import brain_slices, case_metrics, dice, mean_metrics, score_test_case


def test_dice_by_hand():
    pred = np.array([1, 1, 1, 0, 0], dtype=bool)
    truth = np.array([0, 1, 1, 1, 0], dtype=bool)
    assert dice(pred, truth) == pytest.approx(2 * 2 / (3 + 3))


def test_dice_empty_masks_follow_brats_rule():
    empty = np.zeros((4, 4), dtype=bool)
    one = empty.copy()
    one[1, 1] = True
    assert dice(empty, empty) == 1.0
    assert dice(one, empty) == 0.0
    assert dice(empty, one) == 0.0


def test_case_metrics_regions_and_classes_by_hand():
    # Ground truth: 2 NCR, 3 ED, 1 ET pixels; prediction: NCR right, one ED called ET, ET missed.
    truth = np.array([[1, 1, 2, 2], [2, 4, 0, 0]], dtype=np.uint8)
    pred = np.array([[1, 1, 2, 2], [4, 0, 0, 0]], dtype=np.uint8)
    m = case_metrics(pred, truth)
    # WT: truth 6 pixels, pred 5, overlap 5.
    assert m["dice_WT"] == pytest.approx(10 / 11)
    # TC = {1, 4}: truth {(0,0),(0,1),(1,1)}, pred {(0,0),(0,1),(1,0)}, overlap 2.
    assert m["dice_TC"] == pytest.approx(4 / 6)
    # ET: truth {(1,1)}, pred {(1,0)}: no overlap.
    assert m["dice_ET"] == 0.0
    assert m["dice_mean"] == pytest.approx((10 / 11 + 4 / 6 + 0) / 3)
    assert m["dice_NCR"] == 1.0
    assert m["dice_ED"] == pytest.approx(2 * 2 / (2 + 3))
    assert m["dice_ET_class"] == 0.0
    assert m["accuracy"] == pytest.approx(6 / 8)


def test_tumour_free_slice_predicted_empty_scores_one_everywhere():
    empty = np.zeros((8, 8), dtype=np.uint8)
    m = case_metrics(empty, empty)
    assert all(m[k] == 1.0 for k in ("dice_WT", "dice_TC", "dice_ET", "dice_NCR", "dice_ED", "dice_ET_class", "accuracy"))


def test_mean_metrics_average_over_slices():
    truth = np.zeros((2, 4, 4), dtype=np.uint8)
    truth[0, 0, 0] = 2
    pred = np.zeros_like(truth)
    pred[0, 0, 0] = 2          # slice 0: perfect; slice 1: both empty -> 1
    pred[1, 3, 3] = 2          # ... unless the model invents tumour there: WT 0 on slice 1
    m = mean_metrics(pred, truth)
    assert m["dice_WT"] == pytest.approx(0.5)
    assert m["dice_ET"] == 1.0


def test_test_case_scores_on_a_real_case(brats_samples):
    """The test evaluation's per-case figures (results.json, score_segmentation.py) on
    BraTS2021_00000: its own labels score 1; one voxel added on a tumour-free brain slice is
    one voxel of false positive there and leaves the tumour slices alone."""
    from KANTumorSegLib.preprocessing import brain_mask
    from Training.data import CASE_FOLDERS, read_nifti_case, voxel_ml

    folder = brats_samples / CASE_FOLDERS["BraTS2021_00000"]
    volume, truth = read_nifti_case(folder)
    figures, preds, truths = score_test_case(truth, truth, brain_slices(volume), voxel_ml(folder))
    tumour_z = np.nonzero(truth.any(axis=(0, 1)))[0]
    assert figures["n_tumour_slices"] == len(tumour_z) == len(preds) and np.array_equal(preds, truths)
    assert figures["volume_3d"]["dice_mean"] == 1.0 and figures["tumour_slices"]["dice_mean"] == 1.0
    assert figures["false_positive_ml_tumour_free_slices"] == 0.0
    free = [z for z in range(truth.shape[-1]) if z not in set(tumour_z) and brain_mask(volume[..., z]).any()]
    assert figures["n_tumour_free_brain_slices"] == len(free) > 0
    pred = truth.copy()
    x, y = np.argwhere(brain_mask(volume[..., free[0]]))[0]
    pred[x, y, free[0]] = 2
    figures, _, _ = score_test_case(pred, truth, brain_slices(volume), voxel_ml(folder))
    assert figures["false_positive_ml_tumour_free_slices"] == pytest.approx(voxel_ml(folder)) == pytest.approx(0.001)
    assert figures["tumour_slices"]["dice_mean"] == 1.0 and figures["volume_3d"]["dice_mean"] < 1.0


def test_validation_picks_by_each_3d_patients_own_dice(brats_samples):
    """The per-patient 3D figure the shipped recipe selects by: stacked brain slices score as
    the pasted 240 x 240 x 155 volume does, one figure per 3D validation patient."""
    from KANTumorSegLib.preprocessing import PreprocessingConfig
    from Training.data import CASE_FOLDERS, SliceSet, build_case_set, case_volume
    from Training.metrics import case_metrics
    from Training.train import validation_metrics

    cases = [build_case_set(brats_samples / CASE_FOLDERS[c], c, PreprocessingConfig())
             for c in ("BraTS2021_01477", "BraTS2021_01481")]
    both = SliceSet.concat(cases)
    preds = both.labels.copy()
    edema_case = both.patients == "BraTS2021_01481"
    preds[edema_case] = np.where(preds[edema_case] == 2, 1, preds[edema_case])  # its edema called core
    figures = validation_metrics(preds, both)
    expected = []
    for case in cases:
        mine = both.patients == case.patients[0]
        pasted = case_volume(SliceSet(case.inputs, preds[mine], case.patients, case.sources, case.z, case.corners))
        expected.append(case_metrics(pasted, case_volume(case))["dice_mean"])
    assert expected[0] == 1.0 and expected[1] < 0.9
    assert figures["case3d_dice_mean"] == pytest.approx(np.mean(expected))
    assert figures["case3d_worst"] == pytest.approx(expected[1])
