"""DICOM in, DICOM SEG out, on a real case: the shared BraTS case written as a DICOM study here.

Testing/dicom_series.py writes each modality of the 8-slice crop as one MR series with the tags
a scanner's export has (nothing DICOM is kept in git). The command finds the four series by
their descriptions and sequence parameters, its labels through DICOM are those through NIfTI,
and --dicom-seg writes a DICOM Segmentation that pydicom and highdicom read back with the
segments, codes and voxels of the .seg.nrrd.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from KANTumorSegLib.cli import main
from KANTumorSegLib.exit_codes import EXIT_USER_ERROR

pytest.importorskip("pydicom", reason="pydicom (installed with highdicom: pip install 'kantumorseg[dicom]') writes the test series")

from dicom_series import SEQUENCES, write_study  # noqa: E402

NAMES = {m: f"crop_{m}.nii.gz" for m in SEQUENCES}


@pytest.fixture(scope="module")
def study(small_case: Path, tmp_path_factory) -> Path:
    """The 8-slice crop of BraTS20_Training_001 as a DICOM study: four series in subfolders."""
    folder = tmp_path_factory.mktemp("dicom") / "BraTS20_Training_001"
    write_study(small_case, NAMES, folder)
    return folder


def test_the_four_series_are_told_apart_by_description_and_sequence(study: Path):
    from KANTumorSegLib.dicom import find_sources

    sources = find_sources(study, dict.fromkeys(SEQUENCES))
    assert {m: s.description for m, s in sources.items()} == {m: d for m, (d, _) in SEQUENCES.items()}
    assert sources["t1ce"].contrast == "GADOBUTROL" and sources["flair"].inversion_ms == 2500.0
    # Series folders named one by one: the same series.
    folders = {m: sources[m].folder for m in SEQUENCES}
    assert {m: s.uid for m, s in find_sources(None, folders).items()} == {m: s.uid for m, s in sources.items()}


def test_labels_through_dicom_equal_labels_through_nifti_and_the_seg_reads_back(study, small_case, mixed_model, tmp_path):
    hd = pytest.importorskip("highdicom", reason="highdicom is not installed: pip install 'kantumorseg[dicom]'")
    import pydicom

    from KANTumorSegLib.dicom import find_sources
    from KANTumorSegLib.labels import BRAIN, MORPHOLOGICALLY_ALTERED, SEGMENTS

    common = ["--model", str(mixed_model), "--device", "cpu", "--progress", "none"]
    assert main(["segment", str(study), "-o", str(tmp_path / "dicom"), "--dicom-seg", *common]) == 0
    assert main(["segment", str(small_case), "-o", str(tmp_path / "nifti"), *common]) == 0
    through_dicom = sitk.ReadImage(str(tmp_path / "dicom" / "BraTS20_Training_001_seg.nii.gz"))
    through_nifti = sitk.ReadImage(str(tmp_path / "nifti" / "crop_seg.nii.gz"))
    labels = sitk.GetArrayFromImage(through_nifti)
    assert set(np.unique(labels)) == {0, 1, 2, 4}, "the model must find all three classes for the check to mean something"
    np.testing.assert_array_equal(sitk.GetArrayFromImage(through_dicom), labels)
    assert through_dicom.GetOrigin() == through_nifti.GetOrigin() and through_dicom.GetDirection() == through_nifti.GetDirection()
    volumes = {name: json.loads((tmp_path / name / file).read_text())["regions"]
               for name, file in (("dicom", "BraTS20_Training_001_volumes.json"), ("nifti", "crop_volumes.json"))}
    assert volumes["dicom"] == volumes["nifti"]

    path = tmp_path / "dicom" / "BraTS20_Training_001_seg.dcm"
    dataset = pydicom.dcmread(path)
    t1ce = find_sources(study, dict.fromkeys(SEQUENCES))["t1ce"]
    t1ce_images = [pydicom.dcmread(name, stop_before_pixels=True) for name in t1ce.files]
    assert dataset.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and dataset.Modality == "SEG"
    assert dataset.ReferencedSeriesSequence[0].SeriesInstanceUID == t1ce_images[0].SeriesInstanceUID
    assert dataset.StudyInstanceUID == t1ce_images[0].StudyInstanceUID and dataset.PatientID == "BRATS001"
    segmentation = hd.seg.segread(path)
    for number, segment in enumerate(SEGMENTS, start=1):
        description = segmentation.get_segment_description(number)
        assert description.segment_label == segment.name
        assert (description.segmented_property_type.scheme_designator, description.segmented_property_type.value,
                description.segmented_property_type.meaning) == segment.type_code
        assert description.segmented_property_category.value == MORPHOLOGICALLY_ALTERED[1]
        assert description.anatomic_regions[0].value == BRAIN[1]
    numbers = segmentation.get_pixels_by_source_instance(
        [image.SOPInstanceUID for image in t1ce_images], combine_segments=True, skip_overlap_checks=True)
    expected = np.zeros(labels.shape, dtype=np.uint8)
    for number, segment in enumerate(SEGMENTS, start=1):
        expected[labels == segment.label] = number
    np.testing.assert_array_equal(numbers, expected)


def test_an_ambiguous_study_is_named_in_one_sentence_listing_its_series(small_case, tmp_path, capsys):
    # Two series say "T1 POST": which one is the T1ce cannot be told.
    sequences = {**SEQUENCES, "t1": ("AX T1 POST", {})}
    folder = tmp_path / "study"
    write_study(small_case, NAMES, folder, sequences)
    out = tmp_path / "out"
    assert main(["segment", str(folder), "-o", str(out), "--device", "cpu"]) == EXIT_USER_ERROR
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith("kantumorseg: error: Cannot tell which DICOM series in")
    assert "is the T1CE: 2 look like it" in error and "give its folder with --t1ce" in error
    for description, _ in sequences.values():
        assert f'"{description}"' in error
    assert not out.exists()


def test_dicom_seg_needs_dicom_input(small_case, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["segment", str(small_case), "-o", str(out), "--dicom-seg", "--device", "cpu"]) == EXIT_USER_ERROR
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--dicom-seg writes a DICOM Segmentation" in error and "not a DICOM series" in error
    assert not out.exists()
