"""The library's post-processing on hand-built labelmaps (KANTumorSegLib.postprocess)."""

from __future__ import annotations

import numpy as np
import pytest

from KANTumorSegLib.postprocess import PostprocessConfig, postprocess

VOXEL_ML = 0.001  # 1 mm voxels


def tumour_with_specks() -> np.ndarray:
    labels = np.zeros((40, 40, 20), dtype=np.uint8)
    labels[10:20, 10:20, 5:15] = 2      # 1 mL of edema
    labels[13:17, 13:17, 8:12] = 1      # a core inside it
    labels[14:16, 14:16, 9:11] = 4      # 8 voxels of enhancing tumour
    labels[30:32, 30:32, 2:4] = 2       # a speck of 8 voxels far away
    labels[35, 5, 18] = 4               # a single enhancing voxel
    return labels


def test_small_parts_are_dropped_and_the_largest_kept():
    labels = tumour_with_specks()
    out = postprocess(labels, VOXEL_ML, PostprocessConfig(min_component_ml=0.05))
    assert out[30:32, 30:32, 2:4].sum() == 0 and out[35, 5, 18] == 0
    assert np.array_equal(out[10:20, 10:20, 5:15], labels[10:20, 10:20, 5:15])
    # The largest part stays even when it is below the threshold: a small tumour is never erased.
    alone = np.zeros_like(labels)
    alone[1:3, 1:3, 1:3] = 2
    assert np.array_equal(postprocess(alone, VOXEL_ML, PostprocessConfig(min_component_ml=5.0)), alone)


def test_a_trace_of_enhancing_tumour_becomes_core():
    labels = tumour_with_specks()
    out = postprocess(labels, VOXEL_ML, PostprocessConfig(et_min_ml=0.01))   # 9 voxels of ET < 10
    assert not (out == 4).any() and (out[labels == 4] == 1).all()
    assert np.array_equal(out[labels != 4], labels[labels != 4])
    kept = postprocess(labels, VOXEL_ML, PostprocessConfig(et_min_ml=0.009))  # 9 voxels >= 9
    assert np.array_equal(kept, labels)


def test_rules_off_change_nothing_and_bad_thresholds_are_refused():
    labels = tumour_with_specks()
    assert np.array_equal(postprocess(labels, VOXEL_ML, PostprocessConfig()), labels)
    assert PostprocessConfig.from_dict(None) == PostprocessConfig()
    with pytest.raises(ValueError):
        PostprocessConfig(min_component_ml=-1)
    with pytest.raises(ValueError, match="unknown"):
        PostprocessConfig.from_dict({"min_size": 1})
