"""Input warnings (issue 14): silent on every shared BraTS case, each one firing on a crafted case.

The crafted cases are real scans changed the way real inputs go wrong: BraTS20_Training_001 with
its T2 shifted by 6 mm, its FLAIR shifted by 5 mm inside the common skull-stripping mask, its T2
cut to a slab of 90 slices (resampled onto the T1ce grid by the library), a rescaled T2 given as
FLAIR, every fifth slice only (5 mm slices); and a head with skull and scalp built from the real
skull-on T1 scan of ``_nontumor_sanity`` around the case's brain.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import processes
import pytest
import SimpleITK as sitk

from KANTumorSegLib.input_checks import check_inputs
from KANTumorSegLib.preprocessing import MODALITIES
from KANTumorSegLib.volumes import load_case
from Training.data import CASE_FOLDERS, find_case_files

CASE = "BraTS20_Training_001"
SHARED_3D = CASE_FOLDERS
"""The 15 3D cases of the shared samples (their README, section A)."""
SKULL_ON_T1 = "_nontumor_sanity/niivue-demo-images/chris_t1.nii.gz"


def codes(paths: dict[str, Path]) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the slab's "resampled onto the T1ce grid"
        volume, grid = load_case(paths)
    return [w["code"] for w in check_inputs(volume, grid.grid.GetSpacing())]


def case_paths(folder: Path, case: str) -> dict[str, Path]:
    return {m: folder / f"{case}_{m}.nii.gz" for m in MODALITIES}


@pytest.mark.parametrize("case", sorted(SHARED_3D))
def test_no_warning_on_any_shared_brats_case(brats_samples: Path, case: str):
    folder = brats_samples / SHARED_3D[case]
    if not folder.is_dir():
        pytest.skip(f"{folder} is not in the shared BraTS samples")
    files, _ = find_case_files(folder)  # BraTS 2018-2021 or 2023 names
    assert codes({m: files[m] for m in MODALITIES}) == []


def _read(folder: Path, modality: str) -> sitk.Image:
    return sitk.ReadImage(str(folder / f"{CASE}_{modality}.nii.gz"))


def _like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def _craft(source: Path, out: Path, change) -> dict[str, Path]:
    """The case with ``change(modality, image)`` applied to each of its images, written to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for modality in MODALITIES:
        sitk.WriteImage(change(modality, _read(source, modality)), str(out / f"{CASE}_{modality}.nii.gz"))
    return case_paths(out, CASE)


def skull_on_case(source: Path, skull_on_t1: Path, out: Path) -> dict[str, Path]:
    """The case's brain inside a real head: the skull-on T1 scan, moved so that its head's centre
    sits on the brain's centre, fills every modality outside the brain (scaled to each
    modality's brain intensities), so that skull, scalp and face surround the tumour."""
    head_image = sitk.ReadImage(str(skull_on_t1), sitk.sitkFloat32)
    reference = _read(source, "t1ce")
    brain = sitk.GetArrayFromImage(reference) > 0

    def centre(mask: np.ndarray, image: sitk.Image) -> np.ndarray:
        index = np.array(np.nonzero(mask)).mean(axis=1)[::-1]
        return np.array(image.TransformContinuousIndexToPhysicalPoint([float(i) for i in index]))

    shift = centre(sitk.GetArrayViewFromImage(head_image) > 20, head_image) - centre(brain, reference)
    moved = sitk.Resample(head_image, reference, sitk.TranslationTransform(3, tuple(float(s) for s in shift)),
                          sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    head = sitk.GetArrayFromImage(moved)

    def change(modality: str, image: sitk.Image) -> sitk.Image:
        values = sitk.GetArrayFromImage(image).astype(np.float32)
        scale = np.percentile(values[brain], 75) / np.percentile(head[head > 20], 75)
        return _like(np.where(brain, values, head * scale).astype(np.int16), image)

    return _craft(source, out, change)


def test_a_shifted_modality_is_misaligned(brats_case_001: Path, tmp_path: Path):
    def shift_t2(modality: str, image: sitk.Image) -> sitk.Image:
        if modality != "t2":
            return image
        return _like(np.roll(sitk.GetArrayFromImage(image), 6, axis=2), image)  # 6 mm to the patient's left

    assert codes(_craft(brats_case_001, tmp_path, shift_t2)) == ["misaligned"]


def test_a_modality_shifted_inside_the_common_mask_is_misaligned(brats_case_001: Path, tmp_path: Path):
    # Registered badly, then skull-stripped with the T1ce's mask: the outline matches, the inside does not.
    brain = sitk.GetArrayFromImage(_read(brats_case_001, "t1ce")) > 0

    def shift_flair(modality: str, image: sitk.Image) -> sitk.Image:
        if modality != "flair":
            return image
        values = np.roll(sitk.GetArrayFromImage(image), 5, axis=1)
        return _like(np.where(brain, values, 0).astype(values.dtype), image)

    assert codes(_craft(brats_case_001, tmp_path, shift_flair)) == ["misaligned"]


def test_a_slab_is_partial_coverage(brats_case_001: Path, tmp_path: Path):
    paths = _craft(brats_case_001, tmp_path, lambda m, image: image[:, :, 40:130] if m == "t2" else image)
    assert codes(paths) == ["partial_coverage"]


def test_a_t2_given_as_flair_is_flagged(brats_case_001: Path, tmp_path: Path):
    t2 = sitk.GetArrayFromImage(_read(brats_case_001, "t2")).astype(np.float32)

    def t2_as_flair(modality: str, image: sitk.Image) -> sitk.Image:
        return _like((t2 * 1.5 + 7).astype(np.int16), image) if modality == "flair" else image

    assert codes(_craft(brats_case_001, tmp_path, t2_as_flair)) == ["flair_looks_like_t2"]


def test_thick_slices_are_flagged(brats_case_001: Path, tmp_path: Path):
    assert codes(_craft(brats_case_001, tmp_path, lambda m, image: image[:, :, ::5])) == ["few_axial_slices"]


def test_a_head_with_skull_is_not_skull_stripped_through_the_command(brats_samples: Path, brats_case_001: Path,
                                                                     tmp_path: Path, tiny_model: Path):
    skull_on_t1 = brats_samples / SKULL_ON_T1
    if not skull_on_t1.is_file():
        pytest.skip(f"{skull_on_t1} is not in the shared samples")
    paths = skull_on_case(brats_case_001, skull_on_t1, tmp_path / "head")
    assert codes(paths) == ["not_skull_stripped"]
    # The command completes, prints the message and records it in volumes.json.
    out = tmp_path / "out"
    done = processes.run([sys.executable, "-m", "KANTumorSegLib", "segment", str(tmp_path / "head"), "-o", str(out),
                           "--model", str(tiny_model), "--device", "cpu", "--progress", "none"],
                         capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    recorded = json.loads((out / f"{CASE}_volumes.json").read_text())["warnings"]
    assert [w["code"] for w in recorded] == ["not_skull_stripped"]
    assert "segment again with --prepare" in recorded[0]["message"]
    assert f"kantumorseg: warning: {recorded[0]['message']}" in done.stderr.splitlines()


def test_a_case_without_problems_records_an_empty_list(small_case: Path, tiny_model: Path, tmp_path: Path):
    done = processes.run([sys.executable, "-m", "KANTumorSegLib", "segment", str(small_case), "-o", str(tmp_path),
                           "--model", str(tiny_model), "--device", "cpu", "--progress", "none"],
                         capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "crop_volumes.json").read_text())["warnings"] == []
    assert "warning" not in done.stderr
