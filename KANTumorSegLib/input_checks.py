"""Cheap checks for inputs the model was not made for: they warn, they never refuse.

The model was trained on BraTS-style inputs: four co-registered, skull-stripped modalities
covering the whole brain, with 1 mm axial slices. Each check below looks at the four volumes
on the model grid (``volumes.load_case``: every modality already on the T1ce grid) and returns
``{"code", "message"}`` entries for ``<case>_volumes.json`` (``"warnings"``) and the command's
output. The thresholds sit well away from what the 15 shared BraTS cases show (the values in
the comments were measured on them with these functions); ``Testing/test_input_checks.py`` checks
that none of those cases draws a warning and that each check fires on a crafted case. Everything
runs on every other voxel along each axis (2 mm for BraTS inputs): 0.28-0.32 s for a BraTS case on
two cores (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import numpy as np

from .preprocessing import MODALITIES

NAMES = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}

STEP = 2
"""Every STEP-th voxel along each axis is looked at: the checks look at outlines and centroids."""
FOREGROUND_FRACTION = 0.05
"""A voxel is foreground when above min + 5 % of (99.5th percentile - min) of its modality."""
MAX_BRAIN_ML = 2200.0
"""A skull-stripped brain: 1,247-1,730 mL of foreground in the 15 shared cases; an adult head
with skull and scalp holds 3,000 mL or more (3,022 mL for the crafted skull-on case)."""
MAX_HEAD_TO_BRAIN = 1.3
"""Foreground volume over the brain that deepbet's coarse network finds in the T1 (checked only
where ``kantumorseg[prepare]`` is installed): 0.97-1.04 in the 19 shared cases, 2.20 for the real
skull-on head of the shared samples. It catches a whole head with under MAX_BRAIN_ML of tissue (a
child's); it misses part of a head (the skull-on head's upper half 1.21, its central third 1.03)."""
MIN_HEAD_EXTENT_MM = 100.0
"""The coarse network is asked only about a T1 at least this wide along each axis: on a slab, where
it has no brain-shaped view, its answer means nothing (and it would cost 2 s for nothing)."""
MIN_COVERAGE = 0.8
"""Fraction of the T1ce foreground a modality must cover (lowest in the shared cases: 0.926)."""
MAX_EMPTY_SLICES = 0.1
"""Fraction of the T1ce's brain slices a modality may leave empty (0 in the shared cases)."""
MAX_CENTROID_SHIFT_MM = 4.0
"""Distance between a modality's foreground centroid and the T1ce's (at most 1.95 mm in the shared cases)."""
MIN_OUTLINE_DICE = 0.9
"""Dice of a modality's foreground with the T1ce's (at least 0.961 in the shared cases)."""
MIN_EDGE_SHIFT_MM = 4.0
"""Shift that best lines up a modality's interior edges with the T1ce's, from which it warns
(searched in 2 mm steps per axis, refined between steps: at most 3.2 mm in the 19 shared cases,
BraTS2021_01481's FLAIR; the crafted 5 and 6 mm shifts of Testing/test_input_checks.py warn)."""
EDGE_SEARCH = 4
"""Shifts tried per axis, in (sub-sampled) voxels each way, for the interior edges."""
MAX_FLAIR_T2_CORRELATION = 0.9
"""Correlation of FLAIR with T2 inside the brain (-0.21 to 0.52 in the shared cases)."""
MAX_FLAIR_CSF_RATIO = 1.25
"""FLAIR in the T1-darkest 5 % of the brain's interior (mostly CSF, dark in FLAIR, bright in T2)
over FLAIR's interior median: 0.42-1.05 in the shared cases, 0.78-2.94 for their T2."""
MAX_SLICE_MM = 3.0
"""Axial slice spacing of the T1ce beyond which the volumes lose accuracy (the model saw 1 mm
slices; a brain in 5 mm slices is 26-30 slices). A T1ce that covers part of the brain in thin
slices is not flagged: it is a choice (a slab around the tumour), and the labels stay right."""


def foreground(values: np.ndarray) -> np.ndarray:
    """Voxels clearly above the background of one modality (robust to bright outliers)."""
    low = float(values.min())
    above = values[values > low]
    if above.size == 0:
        return np.zeros(values.shape, dtype=bool)
    high = float(np.percentile(above, 99.5))
    return values > low + FOREGROUND_FRACTION * (high - low)


def _erode(mask: np.ndarray, voxels: int) -> np.ndarray:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8))
    return sitk.GetArrayFromImage(sitk.BinaryErode(image, [voxels] * 3)).astype(bool)


def _centroid_mm(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """The centre of a non-empty mask, in mm from voxel (0, 0, 0)."""
    return np.array(np.nonzero(mask), dtype=float).mean(axis=1) * spacing


def _edges(v: np.ndarray, interior: np.ndarray) -> np.ndarray:
    """Gradient magnitude of a volume, scaled by its spread inside ``interior``."""
    g = np.sqrt(sum(d * d for d in np.gradient(v.astype(np.float32))))
    return g / (float(g[interior].std()) or 1.0)


def _edge_shift(moving: np.ndarray, reference_edges: np.ndarray, interior: np.ndarray) -> np.ndarray:
    """Per axis, the shift (voxels, to a fraction) of ``moving``'s gradient magnitude that best correlates with
    the reference's (``_edges`` of the T1ce, computed once per case) inside ``interior``: the
    brain's edges inside the outline (ventricles, tumour, sulci), which a shared
    skull-stripping mask cannot line up."""
    ref = reference_edges[interior]
    ref = ref - ref.mean()
    mov = _edges(moving, interior)
    best = np.zeros(3)
    for axis in range(3):
        scores = []
        for shift in range(-EDGE_SEARCH, EDGE_SEARCH + 1):
            m = np.roll(mov, shift, axis=axis)[interior]
            m = m - m.mean()
            scores.append(float((m * ref).sum() / (np.sqrt((m * m).sum() * (ref * ref).sum()) or 1.0)))
        peak = int(np.argmax(scores))
        best[axis] = peak - EDGE_SEARCH + _parabola_offset(scores, peak)
    return best


def _parabola_offset(scores: list[float], peak: int) -> float:
    """Where, within half a step of ``peak``, the parabola through it and its two neighbours
    peaks. The edge correlation is sampled in whole (sub-sampled) voxels, and where a scan was
    acquired in thick slices and resliced its peak along that axis is broad: BraTS2021_01481's
    T1 and FLAIR, aligned with the T1ce to 0.1 mm by a rigid registration, peaked one whole
    step off on two of the 4 mm, enough to be called misaligned."""
    if peak in (0, len(scores) - 1):
        return 0.0
    left, centre, right = scores[peak - 1], scores[peak], scores[peak + 1]
    curvature = left - 2.0 * centre + right
    return float(np.clip(0.5 * (left - right) / curvature, -0.5, 0.5)) if curvature < 0 else 0.0


PREPARE_HINT = ("segment again with --prepare (in Slicer: Prepare raw scans), which registers and skull-strips raw "
                "scanner series.")


def skull_ratio(t1: np.ndarray, spacing: tuple[float, float, float], foreground_ml: float) -> float | None:
    """The T1's foreground volume over the brain volume deepbet's coarse network finds in it; None
    where the optional ``[prepare]`` packages are not installed or it finds no brain."""
    from .brain_extraction import coarse_brain_ml, prepare_available

    if min(np.array(t1.shape) * np.array(spacing)) < MIN_HEAD_EXTENT_MM or not prepare_available():
        return None
    brain_ml = coarse_brain_ml(t1, spacing)
    return foreground_ml / brain_ml if brain_ml > 0 else None


def check_inputs(volume: np.ndarray, spacing: tuple[float, float, float]) -> list[dict[str, str]]:
    """Warnings about a (4, X, Y, Z) model-grid volume (channels in ``MODALITIES`` order,
    ``spacing`` in mm along X, Y, Z): a list of {"code", "message"}, empty when all is well."""
    warnings: list[dict[str, str]] = []
    sub = volume[:, ::STEP, ::STEP, ::STEP]
    sub_spacing = np.array(spacing, dtype=float) * STEP
    voxel_ml = float(np.prod(sub_spacing)) / 1000.0
    masks = {m: foreground(sub[i]) for i, m in enumerate(MODALITIES)}
    ref = masks["t1ce"]
    if not ref.any():
        return warnings

    brain_slices = np.nonzero(ref.any(axis=(0, 1)))[0]
    if spacing[2] > MAX_SLICE_MM:
        warnings.append({"code": "few_axial_slices", "message": (
            f"The T1ce has {volume.shape[3]} axial slices of {spacing[2]:.1f} mm: the model segments each axial slice and "
            "was trained on 1 mm slices; with slices this thick the tumour's boundary between slices and the volumes are "
            "coarse (use a 3D T1ce of 1-1.5 mm if there is one).")})

    big = [m for m in MODALITIES if masks[m].sum() * voxel_ml > MAX_BRAIN_ML]
    if big:
        largest = max(masks[m].sum() * voxel_ml for m in big)
        warnings.append({"code": "not_skull_stripped", "message": (
            f"The {', '.join(NAMES[m] for m in big)} image{'s look' if len(big) > 1 else ' looks'} like a head with skull and "
            f"scalp ({largest:.0f} mL of tissue; a brain is under {MAX_BRAIN_ML:.0f} mL): the model was trained on "
            f"skull-stripped brains; {PREPARE_HINT}")})
    else:
        head_to_brain = skull_ratio(volume[MODALITIES.index("t1")], spacing, masks["t1"].sum() * voxel_ml)
        if head_to_brain is not None and head_to_brain > MAX_HEAD_TO_BRAIN:
            warnings.append({"code": "not_skull_stripped", "message": (
                f"The T1 image holds {head_to_brain:.1f} times the brain that a brain-extraction network finds in it: it looks "
                f"like a head with skull and scalp (or a partial view of one), and the model was trained on skull-stripped "
                f"brains; {PREPARE_HINT}")})

    interior = _erode(ref, 4)
    # Away from the array's faces, so that the edge search's shifts never wrap around (a thin
    # slab keeps no interior and skips the edge search).
    margin = EDGE_SEARCH + 1
    interior[:margin] = interior[-margin:] = False
    interior[:, :margin] = interior[:, -margin:] = False
    interior[:, :, :margin] = interior[:, :, -margin:] = False
    reference_edges: np.ndarray | None = None
    partial: set[str] = set()
    for m in MODALITIES:
        if m == "t1ce":
            continue
        covered = float((masks[m] & ref).sum() / ref.sum())
        empty = float(np.mean([not masks[m][..., z].any() for z in brain_slices]))
        if covered < MIN_COVERAGE or empty > MAX_EMPTY_SLICES:
            partial.add(m)
            warnings.append({"code": "partial_coverage", "message": (
                f"The {NAMES[m]} image covers only {covered:.0%} of the T1ce's brain ({empty:.0%} of its axial slices hold no "
                f"{NAMES[m]} signal): a thick or oblique slab resampled onto the T1ce grid; where it is missing the model "
                f"sees no {NAMES[m]} and its labels there are unreliable. Use a {NAMES[m]} series that covers the whole brain.")})
    for m in MODALITIES:
        if m == "t1ce" or m in partial:
            continue
        dice = 2.0 * float((masks[m] & ref).sum()) / float(masks[m].sum() + ref.sum())
        shift_mm = float(np.linalg.norm(_centroid_mm(masks[m], sub_spacing) - _centroid_mm(ref, sub_spacing)))
        misaligned = dice < MIN_OUTLINE_DICE or shift_mm > MAX_CENTROID_SHIFT_MM
        if not misaligned and interior.sum() > 1000:
            # The outline lines up (BraTS-style data share one skull-stripping mask), so look inside it.
            if reference_edges is None:
                reference_edges = _edges(sub[MODALITIES.index("t1ce")], interior)
            edge_mm = float(np.linalg.norm(_edge_shift(sub[MODALITIES.index(m)], reference_edges, interior) * sub_spacing))
            misaligned = edge_mm >= MIN_EDGE_SHIFT_MM
            shift_mm = max(shift_mm, edge_mm)
        if misaligned:
            warnings.append({"code": "misaligned", "message": (
                f"The {NAMES[m]} image does not line up with the T1ce (offset about {shift_mm:.0f} mm, outline overlap "
                f"{dice:.2f}): the four modalities must be co-registered; segment again with --prepare (in Slicer: "
                "Prepare raw scans), which registers each series onto the T1ce.")})

    if "flair" not in partial and "t2" not in partial and interior.sum() > 1000:
        flair, t2, t1 = (sub[MODALITIES.index(m)][interior].astype(np.float64) for m in ("flair", "t2", "t1"))
        r = float(np.corrcoef(flair, t2)[0, 1]) if flair.std() > 0 and t2.std() > 0 else 0.0
        dark = t1 <= np.percentile(t1, 5)
        median = float(np.median(flair))
        csf = float(np.median(flair[dark])) / median if median > 0 else 0.0
        if r > MAX_FLAIR_T2_CORRELATION or csf > MAX_FLAIR_CSF_RATIO:
            warnings.append({"code": "flair_looks_like_t2", "message": (
                f"The FLAIR image looks like a T2 (correlation with the T2 {r:.2f}; fluid is {csf:.1f} times the brain's median "
                "where FLAIR suppresses it): check that the FLAIR series, not a second T2, was given; the model reads edema "
                "from FLAIR.")})
    return warnings
