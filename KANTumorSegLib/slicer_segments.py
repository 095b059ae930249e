"""The 3D Slicer module's segments as the library sees them: NCR, ED and ET masks composed into a
labelmap, the volume table measured from it, the derived WT and TC segments, and Slicer's
terminology entry strings. numpy and the library's measurements are imported inside the
functions (standard library only at module level, see slicer_command).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

TABLE_COLUMNS: tuple[str, ...] = ("Region", "Description", "Volume", "Voxels", "Range")
"""Columns of the module's volume table (Volume in mL; Range, the model's low-high mL, only
after a run with --confidence)."""


REGION_SEGMENTS: tuple[tuple[str, str, tuple[float, float, float]], ...] = (
    ("WT", "Whole tumour", (0.35, 0.55, 0.95)),
    ("TC", "Tumour core", (0.85, 0.45, 0.9)),
)
"""The composite regions the module can add as extra segments: id, name, colour."""


def compose_labels(masks: Mapping[str, object]):
    """An internal labelmap (0/1/2/4) from binary masks of the NCR, ED and ET segments.

    Where edited segments overlap, the inner class wins (ED, then NCR, then ET painted
    last), matching the nesting of the BraTS regions WT > TC > ET.
    """
    import numpy as np

    from .labels import ED, ET, NCR

    shape = next(np.shape(m) for m in masks.values() if m is not None)
    labels = np.zeros(shape, dtype=np.uint8)
    for segment_id, value in (("ED", ED), ("NCR", NCR), ("ET", ET)):
        mask = masks.get(segment_id)
        if mask is not None:
            labels[np.asarray(mask) > 0] = value
    return labels


def volume_rows(masks: Mapping[str, object], spacing_mm: Sequence[float]) -> dict:
    """The volume table (measurements.tumour_volumes: NCR, ED, ET, WT, TC in mL) of the
    segment masks; spacing in mm along the masks' axes, in any consistent order."""
    from .measurements import tumour_volumes

    return tumour_volumes(compose_labels(masks), tuple(float(s) for s in spacing_mm))


def region_masks(labels) -> dict:
    """Binary masks of the composite regions WT and TC of an internal labelmap."""
    import numpy as np

    from .labels import region_mask

    return {segment_id: region_mask(labels, segment_id).astype(np.uint8) for segment_id, _, _ in REGION_SEGMENTS}


def terminology_entry(type_code: tuple[str, str, str]) -> str:
    """A Slicer terminology entry string (``context~category~type~modifier~anatomic
    context~region~region modifier``) for a tumour segment in the brain."""
    from .labels import ANATOMIC_CONTEXT, BRAIN, MORPHOLOGICALLY_ALTERED, TERMINOLOGY_CONTEXT

    return "~".join([TERMINOLOGY_CONTEXT, "^".join(MORPHOLOGICALLY_ALTERED), "^".join(type_code), "^^",
                     ANATOMIC_CONTEXT, "^".join(BRAIN), "^^"])


def region_terminology_entry() -> str:
    """The terminology entry of the WT and TC segments: Neoplasm, Primary, as the ET segment's type."""
    from .labels import ET, SEGMENTS

    return terminology_entry(next(s.type_code for s in SEGMENTS if s.label == ET))
