"""Tumour volumes in millilitres, per class and per BraTS region."""

from __future__ import annotations

import numpy as np

from .labels import ED, ET, NCR, region_mask

VOLUME_ROWS: tuple[tuple[str, str], ...] = (
    ("NCR", "Necrotic and non-enhancing core"),
    ("ED", "Edema"),
    ("ET", "Enhancing tumour"),
    ("WT", "Whole tumour (NCR + ED + ET)"),
    ("TC", "Tumour core (NCR + ET)"),
)


def tumour_volumes(labels: np.ndarray, spacing_mm: tuple[float, float, float]) -> dict:
    """Voxel counts and volumes (mL) of NCR, ED, ET, WT and TC in an internal labelmap."""
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    counts = {
        "NCR": int((labels == NCR).sum()),
        "ED": int((labels == ED).sum()),
        "ET": int((labels == ET).sum()),
        "WT": int(region_mask(labels, "WT").sum()),
        "TC": int(region_mask(labels, "TC").sum()),
    }
    return {
        "spacing_mm": [float(s) for s in spacing_mm],
        "voxel_volume_ml": voxel_ml,
        "regions": [
            {"name": name, "description": description, "voxels": counts[name],
             "volume_ml": round(counts[name] * voxel_ml, 4)}
            for name, description in VOLUME_ROWS
        ],
    }


def whole_tumour_components(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(component index per voxel, 0 outside the tumour; voxel count per index) of the whole
    tumour's 26-connected parts, numbered largest first (index 1 is the largest part)."""
    import SimpleITK as sitk

    mask = sitk.GetImageFromArray(region_mask(labels, "WT").astype(np.uint8))
    components = sitk.RelabelComponent(sitk.ConnectedComponent(mask, True), sortByObjectSize=True)
    index = sitk.GetArrayFromImage(components)
    return index, np.bincount(index.ravel())


def whole_tumour_parts(labels: np.ndarray, voxel_ml: float) -> dict:
    """The whole tumour's separate parts (26-connected), largest first.

    A glioma is mostly one connected lesion. Small separate parts are where a reviewer should
    look first: false positives (the shipped model marks some on tumour-free slices of a
    BraTS 2021 case, docs/RESULTS.md) or satellite lesions. Nothing is removed: only counted.
    """
    _, sizes = whole_tumour_components(labels)
    sizes = sizes[1:]
    return {
        "count": int(len(sizes)),
        "largest_ml": round(float(sizes[0]) * voxel_ml, 4) if len(sizes) else 0.0,
        "others_ml": round(float(sizes[1:].sum()) * voxel_ml, 4),
        "largest_parts_ml": [round(float(size) * voxel_ml, 4) for size in sizes[:10]],
    }


def volumes_csv(volumes: dict) -> str:
    """The volume table as CSV text (region, description, voxels, volume_ml), with
    range_low_ml and range_high_ml when the regions carry ``range_ml`` (``--confidence``); a
    region whose ``range_ml`` is None (the Slicer module's, edited since the run) leaves them empty."""
    ranged = any("range_ml" in r for r in volumes["regions"])
    lines = ["region,description,voxels,volume_ml" + (",range_low_ml,range_high_ml" if ranged else "")]
    lines += [f"{r['name']},{r['description'].replace(',', ' ')},{r['voxels']},{r['volume_ml']}"
              + ((f",{r['range_ml'][0]},{r['range_ml'][1]}" if r.get("range_ml") else ",,") if ranged else "")
              for r in volumes["regions"]]
    return "\n".join(lines) + "\n"


def volume_with_range(region: dict) -> str:
    """A region's volume for people, with its range when there is one: "WT 171.7 mL (165.2-180.1)"."""
    text = f"{region['name']} {region['volume_ml']:.1f} mL"
    if "range_ml" in region:
        low, high = region["range_ml"]
        text += f" ({low:.1f}-{high:.1f})"
    return text


def parts_sentence(parts: dict) -> str | None:
    """The reviewer's pointer to a whole tumour in several parts (None for one part or none);
    the command's summary and the Slicer module's log show the same sentence."""
    if parts["count"] < 2:
        return None
    return (f"WT is in {parts['count']} separate parts: the largest {parts['largest_ml']:.2f} mL, the other "
            f"{parts['count'] - 1} together {parts['others_ml']:.2f} mL (false positives or satellite lesions: "
            "check them in Segment Editor).")
