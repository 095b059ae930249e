"""Label conventions, tumour regions and the segments written for Slicer.

The model always predicts in the BraTS 2017-2021 numbering (0 background, 1 NCR/NET,
2 ED, 4 ET); ``--labels brats2023`` renumbers only what is written (ET becomes 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NCR, ED, ET = 1, 2, 4
"""BraTS 2017-2021 label values: necrotic / non-enhancing core, edema, enhancing tumour."""

CLASS_LABELS: tuple[int, ...] = (NCR, ED, ET)

REGIONS: dict[str, tuple[int, ...]] = {
    "WT": (NCR, ED, ET),
    "TC": (NCR, ET),
    "ET": (ET,),
}
"""The BraTS evaluation regions: whole tumour, tumour core, enhancing tumour."""

LABEL_CONVENTIONS: dict[str, dict[int, int]] = {
    "brats2020": {0: 0, NCR: 1, ED: 2, ET: 4},
    "brats2023": {0: 0, NCR: 1, ED: 2, ET: 3},
}
"""Internal label -> written label, for each convention the command accepts."""


@dataclass(frozen=True)
class SegmentInfo:
    """One tumour class as Slicer shows it: name, colour and SNOMED CT terminology."""

    label: int
    id: str
    name: str
    color: tuple[float, float, float]
    type_code: tuple[str, str, str]


SEGMENTS: tuple[SegmentInfo, ...] = (
    # NCR and ED: the colours Slicer's terminology recommends for Necrosis and Edema
    # (216, 191, 216) and (140, 224, 228); it recommends none for Neoplasm, Primary.
    SegmentInfo(NCR, "NCR", "Necrotic and non-enhancing tumour core", (216 / 255, 191 / 255, 216 / 255),
                ("SCT", "6574001", "Necrosis")),
    SegmentInfo(ED, "ED", "Edema", (140 / 255, 224 / 255, 228 / 255), ("SCT", "79654002", "Edema")),
    SegmentInfo(ET, "ET", "Enhancing tumour", (0.9, 0.15, 0.15),
                ("SCT", "86049000", "Neoplasm, Primary")),
)

TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
"""Slicer's DICOM master list: its Morphologically Altered Structure category holds Necrosis, Edema
and Neoplasm, Primary (the General Anatomy list has no neoplasm type, so Slicer would show ET as unknown)."""
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
MORPHOLOGICALLY_ALTERED = ("SCT", "49755003", "Morphologically Altered Structure")
BRAIN = ("SCT", "12738006", "Brain")


def terminology(segment: SegmentInfo) -> dict:
    """The slicerio terminology entry of a segment (category, type, region Brain)."""
    return {
        "contextName": TERMINOLOGY_CONTEXT,
        "category": list(MORPHOLOGICALLY_ALTERED),
        "type": list(segment.type_code),
        "anatomicContextName": ANATOMIC_CONTEXT,
        "anatomicRegion": list(BRAIN),
    }


def region_mask(labels: np.ndarray, region: str) -> np.ndarray:
    """Boolean mask of a BraTS region (WT, TC or ET) in an internal labelmap."""
    return np.isin(labels, REGIONS[region])


def to_convention(labels: np.ndarray, convention: str) -> np.ndarray:
    """Renumber an internal labelmap into the named convention (uint8)."""
    mapping = LABEL_CONVENTIONS[convention]
    out = np.zeros(labels.shape, dtype=np.uint8)
    for internal, written in mapping.items():
        out[labels == internal] = written
    return out

