"""Odd but valid input gives the same tumour (issue 6).

The 8-slice crop of BraTS20_Training_001 is rewritten in tmp_path: in another orientation
(RAS; axes permuted as a sagittal acquisition would store them), with each modality's
intensities multiplied by a constant, with FLAIR on another overlapping grid (a smaller
field of view; or resampled to 1.2 mm and shifted), and resampled to 0.5 mm or 2 mm in-plane.
Each is segmented by the real pipeline (segment_case, the code behind ``kantumorseg segment``),
its labelmap mapped back to the plain run's reference grid
by nearest neighbour, and compared to the plain run: WT Dice >= 0.98, >= 0.9 where voxels
were interpolated (resampling loses detail that no pipeline can restore).

Those thresholds are about a trained model, so they run with the shipped model
(Resources/Models/kanunet2d_brats.safetensors) and skip while it is absent. Where the
property is exact (orientation, intensity scale), a random-weights model checks it as label
identity: any change of the network's input would change its labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk

from KANTumorSegLib.labels import region_mask
from KANTumorSegLib.pipeline import segment_case
from KANTumorSegLib.volumes import resample_like
from KANTumorSegLib.weights import default_model_path

MODALITIES = ("t1", "t1ce", "t2", "flair")
INTENSITY_FACTORS = {"t1": 3.7, "t1ce": 0.21, "t2": 12.5, "flair": 1.9}
"""Another scanner's scale: a different factor per modality."""

Variant = Callable[[dict[str, sitk.Image]], dict[str, sitk.Image]]


def ras(images: dict[str, sitk.Image]) -> dict[str, sitk.Image]:
    return {m: sitk.DICOMOrient(image, "RAS") for m, image in images.items()}


def permuted(images: dict[str, sitk.Image]) -> dict[str, sitk.Image]:
    # Slices along the first stored axis, as a 3D sagittal acquisition, also flipped (RAS).
    return {m: sitk.PermuteAxes(sitk.DICOMOrient(image, "RAS"), [2, 0, 1]) for m, image in images.items()}


def scaled(images: dict[str, sitk.Image]) -> dict[str, sitk.Image]:
    return {m: sitk.Cast(image, sitk.sitkFloat32) * INTENSITY_FACTORS[m] for m, image in images.items()}


def flair_on_another_grid(images: dict[str, sitk.Image]) -> dict[str, sitk.Image]:
    # A smaller field of view (other size and origin, same voxels): overlapping, so resampled
    # onto T1ce with a warning, background outside.
    return {**images, "flair": images["flair"][18:222, 12:230, :]}


def flair_resampled(images: dict[str, sitk.Image]) -> dict[str, sitk.Image]:
    # 1.2 mm in-plane, shifted by 5.3 mm: interpolated twice (there and back onto T1ce).
    flair = images["flair"]
    spacing = (1.2, 1.2, flair.GetSpacing()[2])
    size = [int(flair.GetSize()[0] / 1.2), int(flair.GetSize()[1] / 1.2), flair.GetSize()[2]]
    origin = tuple(o + d for o, d in zip(flair.GetOrigin(), (5.3, -5.3, 0.0)))
    grid = sitk.Resample(flair, size, sitk.Transform(), sitk.sitkLinear, origin, spacing, flair.GetDirection(), 0.0,
                         flair.GetPixelID())
    return {**images, "flair": grid}


def in_plane(spacing_mm: float) -> Variant:
    def resample(images: dict[str, sitk.Image]) -> dict[str, sitk.Image]:
        reference = images["t1ce"]
        factor = reference.GetSpacing()[0] / spacing_mm
        size = [int(round(reference.GetSize()[0] * factor)), int(round(reference.GetSize()[1] * factor)), reference.GetSize()[2]]
        # Keep the field of view: the first voxel centre moves by half the change of spacing.
        shift = (spacing_mm - reference.GetSpacing()[0]) / 2
        origin = np.array(reference.GetOrigin()) + np.array(reference.GetDirection()).reshape(3, 3) @ [shift, shift, 0.0]
        return {m: sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, tuple(origin),
                                 (spacing_mm, spacing_mm, reference.GetSpacing()[2]), reference.GetDirection(), 0.0,
                                 image.GetPixelID())
                for m, image in images.items()}
    resample.__name__ = f"in_plane_{spacing_mm:g}mm"
    return resample


def ringing(images: dict[str, sitk.Image]) -> dict[str, sitk.Image]:
    """What spline resampling (BraTS Toolkit, ANTs, FSL) leaves: small negative values in a rim
    of 3 voxels around the brain, on every second slice, in every modality."""
    brain = sitk.Image(images["t1ce"].GetSize(), sitk.sitkUInt8)
    brain.CopyInformation(images["t1ce"])
    for image in images.values():
        brain = brain | sitk.Cast(image > 0, sitk.sitkUInt8)
    rim = sitk.GetArrayFromImage(sitk.BinaryDilate(brain, [3, 3, 0]) - brain).astype(bool)
    rim[1::2] = False
    rng = np.random.default_rng(0)
    out = {}
    for m, image in images.items():
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        array[rim] = -rng.uniform(0.5, 40.0, int(rim.sum()))
        ringed = sitk.GetImageFromArray(array)
        ringed.CopyInformation(image)
        out[m] = ringed
    return out


def write_case(images: dict[str, sitk.Image], folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True)
    paths = {m: folder / f"odd_{m}.nii.gz" for m in MODALITIES}
    for m, path in paths.items():
        sitk.WriteImage(images[m], str(path))
    return paths


def run(paths: dict[str, Path], model: Path, out: Path) -> sitk.Image:
    """The command's pipeline on a case; its labelmap as written (on the case's T1ce grid)."""
    result = segment_case(paths, out, "odd", model, device="cpu", batch_size=8)
    return sitk.ReadImage(str(result.files["labelmap"]))


def wt_dice(a: np.ndarray, b: np.ndarray) -> float:
    wa, wb = region_mask(a, "WT"), region_mask(b, "WT")
    total = int(wa.sum() + wb.sum())
    return 1.0 if total == 0 else 2.0 * int((wa & wb).sum()) / total


class Comparison:
    """The plain run of the small case and any variant's labels on the plain reference grid."""

    def __init__(self, case: Path, model: Path, tmp: Path) -> None:
        self.images = {m: sitk.ReadImage(str(case / f"crop_{m}.nii.gz")) for m in MODALITIES}
        self.model = model
        self.tmp = tmp
        self.plain = run({m: case / f"crop_{m}.nii.gz" for m in MODALITIES}, model, tmp / "plain")
        self.plain_array = sitk.GetArrayFromImage(self.plain)

    def variant(self, make: Variant) -> np.ndarray:
        name = make.__name__
        labels = run(write_case(make(self.images), self.tmp / name / "case"), self.model, self.tmp / name / "out")
        return sitk.GetArrayFromImage(resample_like(labels, self.plain, sitk.sitkNearestNeighbor, 0))


@pytest.fixture(scope="module")
def random_comparison(small_case: Path, mixed_model: Path, tmp_path_factory) -> Comparison:
    return Comparison(small_case, mixed_model, tmp_path_factory.mktemp("odd_random"))


@pytest.fixture(scope="module")
def trained_comparison(small_case: Path, tmp_path_factory) -> Comparison:
    model = default_model_path()
    if not model.is_file():
        pytest.skip(f"the trained model {model} is absent (the training issue produces it); "
                    "the odd-input Dice thresholds are about a trained model")
    return Comparison(small_case, model, tmp_path_factory.mktemp("odd_trained"))


@pytest.mark.parametrize("make", [ras, permuted], ids=["ras", "permuted"])
def test_orientation_gives_identical_labels_with_random_weights(random_comparison: Comparison, make: Variant):
    labels = random_comparison.variant(make)
    assert len(np.unique(random_comparison.plain_array)) >= 3, "the random model should predict several labels"
    np.testing.assert_array_equal(labels, random_comparison.plain_array)


def test_intensity_scale_gives_the_same_labels_with_random_weights(random_comparison: Comparison):
    # Min-max scaling removes the factor; only float rounding remains.
    labels = random_comparison.variant(scaled)
    assert np.mean(labels == random_comparison.plain_array) >= 0.999
    assert wt_dice(labels, random_comparison.plain_array) >= 0.99


# Orientation and intensity scale give the network the same input, so the random-weights
# tests above check them exactly (and the trained model measured WT Dice 1.0 on both); the
# trained model's run time (about 6 s per variant on 2 cores) goes to the grid changes.
@pytest.mark.parametrize("make, threshold", [
    (flair_on_another_grid, 0.98), (flair_resampled, 0.9), (in_plane(0.5), 0.9), (in_plane(2.0), 0.9),
], ids=["flair_on_another_grid", "flair_resampled_1.2mm", "in_plane_0.5mm", "in_plane_2mm"])
def test_trained_model_finds_the_same_tumour(trained_comparison: Comparison, make: Variant, threshold: float):
    assert region_mask(trained_comparison.plain_array, "WT").sum() > 1000, "the trained model should find the tumour"
    dice = wt_dice(trained_comparison.variant(make), trained_comparison.plain_array)
    print(f"WT Dice {make.__name__}: {dice:.4f}")
    assert dice >= threshold


def test_negative_ringing_around_the_brain_changes_nothing(small_case: Path, mixed_model: Path, tmp_path: Path):
    """Issue 14: a registration pipeline's undershoot below the zero background must give the
    labels, volumes and overview picture of the same input clipped at 0 (which the original is),
    and no input warning of its own. With random weights any change of the network's input
    would change its labels, so identity is the test."""
    import json

    images = {m: sitk.ReadImage(str(small_case / f"crop_{m}.nii.gz")) for m in MODALITIES}
    ringed = ringing(images)
    assert sum(int((sitk.GetArrayViewFromImage(i) < 0).sum()) for i in ringed.values()) > 1000
    results = {}
    for name, case in (("plain", images), ("ringing", ringed)):
        paths = write_case(case, tmp_path / name / "case")
        results[name] = segment_case(paths, tmp_path / name / "out", "odd", mixed_model, device="cpu", batch_size=8)
    labels = {n: sitk.GetArrayFromImage(sitk.ReadImage(str(r.files["labelmap"]))) for n, r in results.items()}
    assert len(np.unique(labels["plain"])) >= 3
    np.testing.assert_array_equal(labels["ringing"], labels["plain"])
    assert results["ringing"].files["overview"].read_bytes() == results["plain"].files["overview"].read_bytes()
    warnings = {n: json.loads(r.files["volumes_json"].read_text()).get("warnings", []) for n, r in results.items()}
    assert warnings["ringing"] == warnings["plain"]
