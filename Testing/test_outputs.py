"""Every output of a run lies on the reference (T1ce) grid and says what it should.

One real case (BraTS20_Training_001, 8 tumour slices) is segmented in-process by
pipeline.segment_case with a random-weights model whose head is centred so that every
class occurs; the outputs are then read back with independent readers (nibabel,
SimpleITK, slicerio, csv, json).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from KANTumorSegLib.case_files import find_modalities
from KANTumorSegLib.overview import GAP
from KANTumorSegLib.pipeline import segment_case

SEGMENT_CODES = {
    "Necrotic and non-enhancing tumour core": ("6574001", (1, 1)),
    "Edema": ("79654002", (2, 2)),
    "Enhancing tumour": ("86049000", (4, 3)),
}
"""Segment name -> (SNOMED CT type code, (label in 0/1/2/4, label in brats2023))."""


@pytest.fixture(scope="module")
def runs(small_case: Path, mixed_model: Path, tmp_path_factory) -> dict[str, tuple]:
    """The case segmented once per label convention: convention -> (result, input paths)."""
    paths = find_modalities(small_case, {})
    out = tmp_path_factory.mktemp("outputs")
    return {labels: (segment_case(paths, out / labels, "crop", mixed_model, "cpu", labels), paths)
            for labels in ("brats2020", "brats2023")}


def test_all_five_files_are_written(runs):
    result, _ = runs["brats2020"]
    assert sorted(p.name for p in result.files["labelmap"].parent.iterdir()) == sorted(
        ["crop_seg.nii.gz", "crop.seg.nrrd", "crop_volumes.json", "crop_volumes.csv", "crop_overview.png"])


def test_labelmap_is_on_the_reference_grid(runs):
    import nibabel as nib

    result, paths = runs["brats2020"]
    reference = sitk.ReadImage(str(paths["t1ce"]))
    labelmap = sitk.ReadImage(str(result.files["labelmap"]))
    assert labelmap.GetSize() == reference.GetSize()
    assert labelmap.GetSpacing() == pytest.approx(reference.GetSpacing())
    assert labelmap.GetOrigin() == pytest.approx(reference.GetOrigin())
    assert labelmap.GetDirection() == pytest.approx(reference.GetDirection())
    np.testing.assert_allclose(nib.load(str(result.files["labelmap"])).affine, nib.load(str(paths["t1ce"])).affine, atol=1e-5)
    values = set(np.unique(sitk.GetArrayViewFromImage(labelmap)).tolist())
    assert values == {0, 1, 2, 4}


def test_brats2023_convention_writes_three_for_enhancing_tumour(runs):
    default = sitk.GetArrayFromImage(sitk.ReadImage(str(runs["brats2020"][0].files["labelmap"])))
    renumbered = sitk.GetArrayFromImage(sitk.ReadImage(str(runs["brats2023"][0].files["labelmap"])))
    assert set(np.unique(renumbered).tolist()) == {0, 1, 2, 3}
    np.testing.assert_array_equal(renumbered, np.where(default == 4, 3, default))
    assert json.loads(runs["brats2023"][0].files["volumes_json"].read_text())["label_convention"] == "brats2023"


@pytest.mark.parametrize("labels", ["brats2020", "brats2023"])
def test_slicer_segmentation_reads_back_with_names_colours_terminology_and_geometry(runs, labels):
    import slicerio

    result, paths = runs[labels]
    segmentation = slicerio.read_segmentation(str(result.files["segmentation"]))
    reference = sitk.ReadImage(str(paths["t1ce"]))
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.array(reference.GetDirection()).reshape(3, 3) * np.array(reference.GetSpacing())
    ijk_to_lps[:3, 3] = reference.GetOrigin()
    np.testing.assert_allclose(segmentation["ijkToLPS"], ijk_to_lps, atol=1e-6)

    segments = segmentation["segments"]
    assert [s["name"] for s in segments] == list(SEGMENT_CODES)
    colours = [tuple(s["color"]) for s in segments]
    assert len(set(colours)) == 3 and all(len(c) == 3 and all(0 <= v <= 1 for v in c) for c in colours)
    labelmap = sitk.GetArrayFromImage(sitk.ReadImage(str(result.files["labelmap"]))).transpose(2, 1, 0)
    assert segmentation["voxels"].shape == labelmap.shape
    for segment in segments:
        code, written = SEGMENT_CODES[segment["name"]]
        terminology = segment["terminology"]
        assert terminology["type"][:2] == ["SCT", code]
        assert terminology["anatomicRegion"][:2] == ["SCT", "12738006"]
        assert terminology["category"][0] == "SCT"
        # The segment's voxels are exactly the labelmap's voxels of that class.
        in_segment = segmentation["voxels"] == segment["labelValue"]
        written_label = written[0] if labels == "brats2020" else written[1]
        np.testing.assert_array_equal(in_segment, labelmap == written_label)
        assert in_segment.any()


def test_volumes_equal_voxel_counts_times_voxel_volume(runs):
    result, _ = runs["brats2020"]
    labelmap = sitk.ReadImage(str(result.files["labelmap"]))
    array = sitk.GetArrayFromImage(labelmap)
    voxel_ml = float(np.prod(labelmap.GetSpacing())) / 1000
    expected_voxels = {"NCR": (array == 1).sum(), "ED": (array == 2).sum(), "ET": (array == 4).sum(),
                       "WT": (array > 0).sum(), "TC": np.isin(array, (1, 4)).sum()}

    report = json.loads(result.files["volumes_json"].read_text())
    assert report["spacing_mm"] == pytest.approx(list(labelmap.GetSpacing()))
    assert report["voxel_volume_ml"] == pytest.approx(voxel_ml)
    rows = {row["name"]: row for row in report["regions"]}
    assert list(rows) == ["NCR", "ED", "ET", "WT", "TC"]
    with open(result.files["volumes_csv"], newline="") as stream:
        table = {row["region"]: row for row in csv.DictReader(stream)}
    for name, voxels in expected_voxels.items():
        assert voxels > 0
        assert rows[name]["voxels"] == voxels
        assert rows[name]["volume_ml"] == pytest.approx(voxels * voxel_ml, abs=1e-4)
        assert int(table[name]["voxels"]) == voxels
        assert float(table[name]["volume_ml"]) == pytest.approx(voxels * voxel_ml, abs=1e-4)
    assert report["reference"] == "t1ce" and report["case"] == "crop"


def test_whole_tumour_parts_match_an_independent_labelling(runs, brats_case_001: Path):
    """The separate WT parts against scipy's 26-connected labelling: of the expert segmentation
    of BraTS20_Training_001 (several parts), and of the labelmap a run wrote, as volumes.json
    reports them."""
    from scipy import ndimage

    from KANTumorSegLib.measurements import whole_tumour_parts

    def independent(array: np.ndarray, voxel_ml: float) -> dict:
        components, count = ndimage.label(array > 0, structure=np.ones((3, 3, 3)))
        sizes = np.sort(np.bincount(components.ravel())[1:])[::-1]
        return {"count": count, "largest_ml": round(float(sizes[0]) * voxel_ml, 4),
                "others_ml": round(float(sizes[1:].sum()) * voxel_ml, 4),
                "largest_parts_ml": [round(float(v) * voxel_ml, 4) for v in sizes[:10]]}

    expert = sitk.GetArrayFromImage(sitk.ReadImage(str(brats_case_001 / "BraTS20_Training_001_seg.nii.gz")))
    expected = independent(expert, 0.001)
    assert expected["count"] > 1
    assert whole_tumour_parts(expert, 0.001) == expected

    result, _ = runs["brats2020"]
    labelmap = sitk.ReadImage(str(result.files["labelmap"]))
    written = json.loads(result.files["volumes_json"].read_text())["whole_tumour_parts"]
    assert written == independent(sitk.GetArrayFromImage(labelmap), float(np.prod(labelmap.GetSpacing())) / 1000)


def test_whole_tumour_parts_hand_counted() -> None:
    """A 3x3x3 enhancing cube, an edema voxel touching it only at a corner (26-connected: the
    same part) and a far edema voxel (its own part); then no tumour at all."""
    from KANTumorSegLib.measurements import parts_sentence, whole_tumour_parts

    labels = np.zeros((20, 20, 20), dtype=np.uint8)
    labels[2:5, 2:5, 2:5] = 4
    labels[5, 5, 5] = 2
    labels[15, 15, 15] = 2
    assert whole_tumour_parts(labels, 0.002) == {"count": 2, "largest_ml": 0.056, "others_ml": 0.002,
                                                  "largest_parts_ml": [0.056, 0.002]}
    assert whole_tumour_parts(np.zeros((4, 4, 4), dtype=np.uint8), 0.001) == {
        "count": 0, "largest_ml": 0.0, "others_ml": 0.0, "largest_parts_ml": []}
    assert parts_sentence(whole_tumour_parts(labels, 0.002)) == (
        "WT is in 2 separate parts: the largest 0.06 mL, the other 1 together 0.00 mL (false positives or satellite "
        "lesions: check them in Segment Editor).")
    labels[15, 15, 15] = 0
    assert parts_sentence(whole_tumour_parts(labels, 0.002)) is None


def test_overview_png_is_readable_with_five_panels(runs):
    result, paths = runs["brats2020"]
    png = sitk.ReadImage(str(result.files["overview"]))
    x, y, _ = sitk.ReadImage(str(paths["t1ce"])).GetSize()
    # Panels are axial slices of the model grid (1 mm, LPS: the reference here), side by side,
    # with their titles above and the legend below (Testing/test_overview.py).
    assert png.GetSize()[0] == 5 * x + 4 * GAP and png.GetSize()[1] > y
    assert png.GetNumberOfComponentsPerPixel() == 3
    pixels = sitk.GetArrayFromImage(png)
    assert pixels.max() > 0 and pixels.std() > 10
