"""Orientation and geometry: the same head stored in other orientations, axis orders and
spacings gives the same model-grid volume, and labels map back onto each stored grid.

The variants are written with SimpleITK from a region of interest of a real case
(BraTS20_Training_001 around its tumour), so each stays small and fast to read.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from KANTumorSegLib.errors import KANTumorSegError
from KANTumorSegLib.preprocessing import MODALITIES
from KANTumorSegLib.volumes import labels_to_reference, load_case, resample_like, to_model_array

ROI = (slice(60, 180), slice(50, 200), slice(70, 90))
"""x, y, z voxel ranges of BraTS20_Training_001 holding the tumour (SimpleITK index order)."""


def sagittal(image: sitk.Image) -> sitk.Image:
    """The same image stored as a sagittal acquisition: slices along left-right, rows
    superior to inferior (PermuteAxes and Flip keep every voxel's physical position)."""
    return sitk.Flip(sitk.PermuteAxes(image, [1, 2, 0]), [False, True, False])


VARIANTS = {
    "ras": lambda image: sitk.Flip(image, [True, True, False]),
    "sagittal": sagittal,
    "coronal_ras": lambda image: sitk.Flip(sitk.PermuteAxes(image, [0, 2, 1]), [True, False, False]),
}
"""Name -> how a variant is made from the LPS original; all exact (no interpolation)."""


def write_case(images: dict[str, sitk.Image], folder: Path, suffix: str = ".nii") -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, image in images.items():
        paths[name] = folder / f"case_{name}{suffix}"
        sitk.WriteImage(image, str(paths[name]))
    return paths


@pytest.fixture(scope="module")
def roi_images(case_paths) -> dict[str, sitk.Image]:
    files = case_paths["BraTS20_Training_001"]
    return {m: sitk.ReadImage(str(files[m]))[ROI] for m in (*MODALITIES, "seg")}


@pytest.fixture(scope="module")
def original(roi_images, tmp_path_factory):
    """The LPS region of interest as written: (paths, model-grid volume, grid, seg on the model grid)."""
    paths = write_case(roi_images, tmp_path_factory.mktemp("lps"))
    volume, grid = load_case(paths)
    seg = to_model_array(sitk.ReadImage(str(paths["seg"])), grid.grid).astype(np.uint8)
    return paths, volume, grid, seg


@pytest.mark.parametrize("case", ["BraTS20_Training_001", "Brats18_2013_2_1", "BraTS2021_00000"])
def test_model_grid_layout_is_nibabel_layout_of_brats_files(case_paths, case):
    """For BraTS files (LPS, 1 mm) the model grid is the stored grid: array == get_fdata()."""
    import nibabel as nib

    files = case_paths[case]
    volume, grid = load_case(files)
    assert not grid.resampled
    for c, modality in enumerate(MODALITIES):
        np.testing.assert_array_equal(volume[c], nib.load(str(files[modality])).get_fdata().astype(np.float32))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reoriented_case_gives_the_same_model_grid_volume_and_labels_map_back(variant, roi_images, original, tmp_path):
    _, volume, grid, seg = original
    images = {name: VARIANTS[variant](image) for name, image in roi_images.items()}
    # The sagittal variant goes through NRRD, the others through NIfTI.
    paths = write_case(images, tmp_path, ".nrrd" if variant == "sagittal" else ".nii")
    assert sitk.ReadImage(str(paths["t1ce"])).GetDirection() != grid.grid.GetDirection()

    variant_volume, variant_grid = load_case(paths)
    np.testing.assert_array_equal(variant_volume, volume)
    assert variant_grid.grid.GetOrigin() == pytest.approx(grid.grid.GetOrigin())
    assert variant_grid.grid.GetDirection() == pytest.approx(grid.grid.GetDirection())

    stored_seg = sitk.ReadImage(str(paths["seg"]))
    back = labels_to_reference(seg, variant_grid)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(stored_seg))
    for attribute in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(back, attribute)() == pytest.approx(getattr(stored_seg, attribute)())


def resample_to(image: sitk.Image, spacing: float, interpolator: int) -> sitk.Image:
    """The image on a grid of the given isotropic spacing covering the same voxel extent."""
    old_spacing = np.array(image.GetSpacing())
    size = [int(round(n * s / spacing)) for n, s in zip(image.GetSize(), old_spacing)]
    direction = np.array(image.GetDirection()).reshape(3, 3)
    # Same outer edges: the first voxel centre moves by half the spacing difference.
    origin = np.array(image.GetOrigin()) + direction @ ((spacing - old_spacing) / 2)
    return sitk.Resample(image, size, sitk.Transform(), interpolator, origin.tolist(), [spacing] * 3,
                         image.GetDirection(), 0, image.GetPixelID())


def test_half_millimetre_case_is_resampled_to_one_millimetre_in_plane_and_back(roi_images, original, tmp_path):
    _, volume, grid, seg = original
    images = {m: resample_to(image, 0.5, sitk.sitkNearestNeighbor if m == "seg" else sitk.sitkLinear)
              for m, image in roi_images.items()}
    paths = write_case(images, tmp_path)
    fine_volume, fine_grid = load_case(paths)

    assert fine_grid.resampled
    assert fine_grid.grid.GetSpacing() == pytest.approx((1.0, 1.0, 0.5))
    # 1 mm in-plane on the same field of view: the original's in-plane grid, twice the slices.
    assert fine_volume.shape == (4, volume.shape[1], volume.shape[2], 2 * volume.shape[3])
    assert fine_grid.grid.GetOrigin()[:2] == pytest.approx(grid.grid.GetOrigin()[:2])
    # Two half-millimetre slices bracket each original slice; their mean is close to it.
    paired = fine_volume.reshape(*fine_volume.shape[:3], -1, 2).mean(axis=-1)
    for c in range(4):
        assert np.corrcoef(paired[c].ravel(), volume[c].ravel())[0, 1] > 0.97

    # Labels: the original labels on the fine model grid, back onto the 0.5 mm reference grid.
    seg_image = sitk.GetImageFromArray(seg.transpose(2, 1, 0))
    seg_image.CopyInformation(grid.grid)
    fine_seg = sitk.GetArrayFromImage(resample_like(seg_image, fine_grid.grid, sitk.sitkNearestNeighbor)).transpose(2, 1, 0)
    back = labels_to_reference(fine_seg, fine_grid)
    stored = sitk.ReadImage(str(paths["seg"]))
    assert back.GetSize() == stored.GetSize() and back.GetSpacing() == pytest.approx(stored.GetSpacing())
    assert back.GetOrigin() == pytest.approx(stored.GetOrigin())
    back_array, stored_array = sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(stored)
    assert set(np.unique(back_array)) <= {0, 1, 2, 4}
    for label in (1, 2, 4):
        a, b = back_array == label, stored_array == label
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice > 0.99, (label, dice)


def test_modality_on_another_overlapping_grid_is_resampled_with_a_warning(roi_images, original, tmp_path):
    _, volume, _, _ = original
    images = dict(roi_images)
    images["t2"] = resample_to(roi_images["t2"], 2.0, sitk.sitkLinear)
    paths = write_case(images, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moved, _ = load_case(paths)
    assert any("resampled onto the T1ce grid" in str(w.message) for w in caught)
    assert moved.shape == volume.shape
    np.testing.assert_array_equal(moved[[0, 1, 3]], volume[[0, 1, 3]])
    brain = volume[2] > 0
    assert np.corrcoef(moved[2][brain], volume[2][brain])[0, 1] > 0.8


def test_modality_that_does_not_overlap_is_refused(roi_images, tmp_path):
    images = dict(roi_images)
    far = sitk.Image(roi_images["flair"])
    far.SetOrigin([o + 500.0 for o in far.GetOrigin()])
    images["flair"] = far
    paths = write_case(images, tmp_path)
    with pytest.raises(KANTumorSegError, match="FLAIR file .*case_flair.nii does not overlap the T1ce image"):
        load_case(paths)


def test_oblique_axial_acquisition_keeps_its_own_axial_slices(roi_images, original, tmp_path):
    """A head tilted 20 degrees about the superior axis (an oblique axial acquisition): the
    model sees the stored axial slices as they are (no resampling at 1 mm), in LPS order,
    and the labels go back onto the oblique grid exactly."""
    _, volume, _, seg = original
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    images = {}
    for name, image in roi_images.items():
        tilted = VARIANTS["ras"](image)
        tilted.SetDirection((rotation @ np.array(tilted.GetDirection()).reshape(3, 3)).ravel().tolist())
        images[name] = tilted
    paths = write_case(images, tmp_path)
    oblique_volume, oblique_grid = load_case(paths)
    assert not oblique_grid.resampled
    np.testing.assert_array_equal(oblique_volume, volume)
    stored_seg = sitk.ReadImage(str(paths["seg"]))
    back = labels_to_reference(seg, oblique_grid)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(stored_seg))
    assert back.GetDirection() == pytest.approx(stored_seg.GetDirection())
