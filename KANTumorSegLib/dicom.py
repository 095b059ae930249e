"""DICOM input: the four series of a study found by their descriptions and sequence parameters.

``kantumorseg segment DICOM_FOLDER`` looks through the folder (and its subfolders) for MR
series, and tells T1, T1ce, T2 and FLAIR apart by the words of their Series Description (or
Protocol Name), with the command's own name endings (case_files.NAME_PATTERNS): ``AX T1 POST``,
``t2_tse_tra``, ``T2-FLAIR``. A T1 series with a contrast agent (Contrast/Bolus Agent, or
``post``/``gd``/``contrast`` in its description) is the T1ce; a series with an inversion time of
FLAIR_INVERSION_MS or more and no T1 word is the FLAIR. When that does not decide, the error
names the series it saw, and ``--t1 SERIES_FOLDER ...`` names each series' folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from .case_files import find_modalities, modality_of, name_tokens
from .errors import KANTumorSegError
from .preprocessing import MODALITIES

FLAIR_INVERSION_MS = 1500.0
"""FLAIR suppresses fluid with an inversion time near 2000-2500 ms (at 1.5-3 T); a T1-weighted
inversion recovery (MPRAGE, about 900-1100 ms) stays below."""

CONTRAST_WORDS = frozenset({"post", "gd", "gad", "gado", "contrast", "ce", "c"})
"""Description words of a contrast-enhanced series (``T1 POST GD``, ``T1+C``)."""

TAGS = {"description": "0008|103e", "protocol": "0018|1030", "modality": "0008|0060", "contrast": "0018|0010",
        "inversion_ms": "0018|0082"}
"""The DICOM tags a series is told apart by: Series Description, Protocol Name, Modality,
Contrast/Bolus Agent, Inversion Time."""


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series: its files in the order the series reader sorts them (by position)."""

    folder: Path
    uid: str
    files: tuple[str, ...] = field(repr=False)
    description: str = ""
    protocol: str = ""
    modality: str = ""
    contrast: str = ""
    inversion_ms: float | None = None
    case_name: str = "case"
    """The name of the case's outputs: the DICOM folder's (or the series folder's) name."""

    def __str__(self) -> str:
        return f'DICOM series "{self.description or self.uid}" in {self.folder}'

    def summary(self) -> str:
        """How the series shows in a message: its description, its size and its folder."""
        return f'"{self.description or "(no description)"}" ({len(self.files)} images, {self.folder})'


Source = Union[Path, DicomSeries]
"""Where a modality's image comes from: a file, or a DICOM series."""


def find_sources(case_dir: Path | None, explicit: dict[str, Path | None]) -> dict[str, Source]:
    """case_files.find_modalities, with DICOM: a folder given with --t1/--t1ce/--t2/--flair is
    the DICOM series in it, and a case folder without images named as in BraTS gives the DICOM
    series it holds (for the modalities not given)."""
    given: dict[str, Source | None] = {m: series_of_folder(p, m) if p is not None and p.is_dir() else p
                                       for m, p in explicit.items()}
    if case_dir is not None and case_dir.is_dir() and not any(modality_of(p) for p in case_dir.iterdir()):
        series = series_in(case_dir, case_dir.resolve().name)
        wanted = tuple(m for m in MODALITIES if given.get(m) is None)
        if series and wanted:
            given.update(find_series(case_dir, series, wanted))
            case_dir = None
    return find_modalities(case_dir, given)


def _tag(reader, key: str) -> str:
    return reader.GetMetaData(TAGS[key]).strip() if reader.HasMetaDataKey(TAGS[key]) else ""


def series_in(folder: Path, case_name: str) -> list[DicomSeries]:
    """Every DICOM series in ``folder`` and its subfolders (none when it holds no DICOM files)."""
    import SimpleITK as sitk

    found = []
    # ITK warns on stderr for every folder without a series: the command's errors are one sentence.
    warned = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        roots = [root for root, _, files in sorted(os.walk(folder)) if files]
        series = [(root, uid) for root in roots for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(root) or ()]
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warned)
    for root, uid in series:
        files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(root, uid))
        reader = sitk.ImageFileReader()
        reader.SetFileName(files[0])
        reader.ReadImageInformation()
        inversion = _tag(reader, "inversion_ms")
        found.append(DicomSeries(Path(root), uid, files, _tag(reader, "description"), _tag(reader, "protocol"),
                                 _tag(reader, "modality"), _tag(reader, "contrast"),
                                 float(inversion) if re.fullmatch(r"[0-9.]+", inversion) else None, case_name))
    return found


def modality_of_series(series: DicomSeries) -> str | None:
    """The modality a series' description and sequence parameters denote, else None."""
    tokens = name_tokens()
    words = set(re.split(r"[^0-9a-z]+", f"{series.description} {series.protocol}".lower())) - {""}
    named = {tokens[word] for word in words if word in tokens}
    # "T2 FLAIR" names both: FLAIR is a T2-weighted inversion recovery.
    if "flair" in named:
        return "flair"
    if "t1" not in named and "t1ce" not in named and series.inversion_ms is not None and series.inversion_ms >= FLAIR_INVERSION_MS:
        return "flair"
    if "t1ce" in named or ("t1" in named and (series.contrast or words & CONTRAST_WORDS)):
        return "t1ce"
    if named == {"t1"}:
        return "t1"
    return "t2" if named == {"t2"} else None


def _seen(series: list[DicomSeries]) -> str:
    return "; ".join(f"{s.summary()} as {modality_of_series(s) or 'none'}" for s in series)


def find_series(folder: Path, series: list[DicomSeries], wanted: tuple[str, ...] = MODALITIES) -> dict[str, DicomSeries]:
    """The series of each wanted modality among a DICOM folder's series; an error naming every
    series seen when a modality has none, or several."""
    candidates = [s for s in series if s.modality in ("MR", "")]
    if not candidates:
        raise KANTumorSegError(f"No MR DICOM series found in {folder} (series seen: {_seen(series)}).")
    matches = {m: [s for s in candidates if modality_of_series(s) == m] for m in wanted}
    # A modality claimed by several series first: it is often why another has none.
    for modality in sorted(wanted, key=lambda m: len(matches[m]) <= 1):
        if len(matches[modality]) != 1:
            what = f"{len(matches[modality])} look like" if matches[modality] else "none looks like"
            raise KANTumorSegError(
                f"Cannot tell which DICOM series in {folder} is the {modality.upper()}: {what} it by Series Description, "
                f"contrast agent or inversion time (series seen: {_seen(candidates)}); give its folder with --{modality}.")
    return {m: found[0] for m, found in matches.items()}


def series_of_folder(folder: Path, modality: str) -> DicomSeries:
    """The one DICOM series in a folder given with --t1/--t1ce/--t2/--flair."""
    found = series_in(folder, folder.resolve().name)
    if len(found) != 1:
        what = "no DICOM series" if not found else f"{len(found)} DICOM series ({_seen(found)})"
        raise KANTumorSegError(f"The {modality.upper()} folder {folder} holds {what}; give the folder of one series with --{modality}.")
    return found[0]


def read_series(series: DicomSeries):
    """The series as one 3D SimpleITK image (ITK sorts the slices by position)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(series.files))
    return reader.Execute()


def write_dicom_seg(path: Path, labels, t1ce: DicomSeries, version: str) -> None:
    """Write a DICOM Segmentation of NCR, ED and ET (labels on the T1ce grid, internal 0/1/2/4)
    that references the T1ce series' images, with the segment labels and SNOMED CT codes of the
    .seg.nrrd (labels.SEGMENTS)."""
    import highdicom as hd
    import numpy as np
    import pydicom
    import SimpleITK as sitk
    from pydicom.sr.codedict import codes

    from .labels import BRAIN, MORPHOLOGICALLY_ALTERED, SEGMENTS

    # The series reader's file order is the order of the labelmap's slices (z).
    sources = [pydicom.dcmread(name) for name in t1ce.files]
    internal = sitk.GetArrayFromImage(labels)
    numbers = np.zeros(internal.shape, dtype=np.uint8)
    for number, segment in enumerate(SEGMENTS, start=1):
        numbers[internal == segment.label] = number

    def concept(code: tuple[str, str, str]) -> hd.sr.CodedConcept:
        return hd.sr.CodedConcept(value=code[1], scheme_designator=code[0], meaning=code[2])

    algorithm = hd.AlgorithmIdentificationSequence(name="KANTumorSeg", version=version,
                                                   family=codes.cid7162.ArtificialIntelligence)
    descriptions = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=segment.name, segmented_property_category=concept(MORPHOLOGICALLY_ALTERED),
        segmented_property_type=concept(segment.type_code), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, anatomic_regions=[concept(BRAIN)])
        for number, segment in enumerate(SEGMENTS, start=1)]
    segmentation = hd.seg.Segmentation(
        source_images=sources, pixel_array=numbers, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=(sources[0].get("SeriesNumber") or 0) + 1000,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="KANTumorSeg", manufacturer_model_name="KANU-Net 2D",
        software_versions=version, device_serial_number="none", series_description="KANTumorSeg tumour segmentation")
    segmentation.save_as(path)
