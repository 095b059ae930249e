"""The library's post-processing on hand-built labelmaps (KANTumorSegLib.postprocess)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import processes
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


def test_the_command_applies_the_cards_post_processing(mixed_model: Path, small_case: Path, tmp_path: Path):
    """The same weights through ``kantumorseg segment`` with and without post-processing in
    their card: the written labels are the rules applied to the raw labels, voxel for voxel
    (the case is on the model grid already: LPS, 1 mm in-plane)."""
    import json
    import shutil
    import sys

    import nibabel as nib

    from KANTumorSegLib.weights import card_path

    # The random model marks nearly every voxel: one part, 19 mL of "enhancing tumour".
    post = PostprocessConfig(min_component_ml=0.05, et_min_ml=25.0)
    with_post = tmp_path / "post.safetensors"
    shutil.copy(mixed_model, with_post)
    card = json.loads(card_path(mixed_model).read_text())
    card_path(with_post).write_text(json.dumps({**card, "postprocessing": post.to_dict()}))

    written = {}
    for name, model in (("raw", mixed_model), ("post", with_post)):
        done = processes.run([sys.executable, "-m", "KANTumorSegLib", "segment", str(small_case), "-o",
                               str(tmp_path / name), "--model", str(model), "--progress", "none"],
                             capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        image = nib.load(str(tmp_path / name / "crop_seg.nii.gz"))
        written[name] = np.asarray(image.dataobj).astype(np.uint8)
    voxel_ml = float(np.prod(image.header.get_zooms()[:3])) / 1000.0
    assert not np.array_equal(written["raw"], written["post"])  # the rules had work to do
    assert np.array_equal(written["post"], postprocess(written["raw"], voxel_ml, post))


def test_parts_are_the_ones_the_summary_counts():
    """A part touching the tumour only at a corner is part of it for the post-processing as for
    the command's summary (``measurements.whole_tumour_parts``, 26-connected): nothing dropped."""
    from KANTumorSegLib.measurements import whole_tumour_parts

    labels = np.zeros((20, 20, 20), dtype=np.uint8)
    labels[2:8, 2:8, 2:8] = 2
    labels[8, 8, 8] = 2  # touches the cube only at its corner voxel (7, 7, 7)
    assert whole_tumour_parts(labels, VOXEL_ML)["count"] == 1
    assert np.array_equal(postprocess(labels, VOXEL_ML, PostprocessConfig(min_component_ml=0.05)), labels)
