"""``--prepare``: raw scanner series made into what the model was trained on, and the way back.

A neurosurgeon's series come each on its own grid (often 0.9 x 0.9 x 5-6 mm axial slabs, tilted
against each other), with skull and scalp. Preparation (1) registers T1, T2 and FLAIR rigidly
onto the T1ce (``registration``), (2) resamples all four onto a 1 mm isotropic grid with
left/posterior/superior axes over the T1ce's extent, the model's grid, and (3) skull-strips them
with a brain mask (``brain_extraction``). The model's labels then go back onto the raw T1ce's own
grid (``volumes.labels_to_reference``), where every output is written and measured.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .preprocessing import MODALITIES
from .progress import no_progress
from .volumes import REFERENCE_MODALITY, ModelGrid, check_distinct, physical_bounds, raise_undershoot, read_image

ISOTROPIC_MM = 1.0
HEAD_MARGIN_MM = 8.0
"""Around the T1ce's head: room for the other series' movement and for the brain mask's margin."""
NAMES = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}
BRAIN_CONTRASTS = ("t1ce", "t1")
"""The images deepbet reads; the brain mask is the union of theirs. deepbet was trained on T1 of
healthy heads, and a tumour changes what it sees: on the shared cases the T1's mask alone cut 1.4 %
of one expert tumour and the T1ce's alone 3.6 % of another, the union nothing beyond 0.05 %
(docs/PERFORMANCE.md, "Preparing raw scans")."""


@dataclass
class PreparedCase:
    """A raw case on the model grid, and what is needed to write its outputs on the raw T1ce grid."""

    volume: np.ndarray
    """(4, X, Y, Z) float32 on the 1 mm isotropic grid, skull-stripped (``volumes.load_case``'s layout)."""
    grid: ModelGrid
    """``reference``: the raw T1ce; ``grid``: the 1 mm isotropic grid the model sees."""
    brain_mask: sitk.Image
    """uint8 0/1 on the raw T1ce grid."""
    images: dict[str, sitk.Image]
    transforms: dict[str, sitk.Transform]
    """Per modality, the registration that maps raw T1ce points into its series (identity for the T1ce)."""
    report: dict
    """What the preparation did, for volumes.json."""

    def on_reference(self) -> np.ndarray:
        """(4, X, Y, Z) of the four registered series on the raw T1ce grid turned to LPS axes (the
        overview's layout, showing the surgeon's own slices)."""
        reference = sitk.DICOMOrient(self.images[REFERENCE_MODALITY], "LPS")
        planes = [sitk.GetArrayFromImage(
            sitk.Resample(self.images[m], reference, self.transforms[m], sitk.sitkLinear, 0.0, sitk.sitkFloat32))
            for m in MODALITIES]
        return np.stack(planes).transpose(0, 3, 2, 1)


def isotropic_grid(reference: sitk.Image, spacing: float = ISOTROPIC_MM) -> sitk.Image:
    """A grid of ``spacing`` mm cubes with identity direction (x left, y posterior, z superior:
    axial slices are ``array[:, :, z]``) covering the reference's head, tilted or not, with a
    margin: the air around it would only slow registration and inference down."""
    from .input_checks import foreground

    head = foreground(sitk.GetArrayViewFromImage(reference))
    # Per array axis (z, y, x), the first and last index holding head (read_image refuses a
    # constant image, so there is one).
    ends = [np.nonzero(head.any(axis=tuple(a for a in range(3) if a != axis)))[0][[0, -1]] for axis in range(3)]
    box = sitk.RegionOfInterest(reference, [int(e[1] - e[0] + 1) for e in ends[::-1]], [int(e[0]) for e in ends[::-1]])
    low, high = physical_bounds(box)
    low, high = low - HEAD_MARGIN_MM, high + HEAD_MARGIN_MM
    size = [int(np.ceil((h - lo) / spacing)) + 1 for lo, h in zip(low, high)]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing((spacing,) * 3)
    grid.SetOrigin(tuple(float(v) for v in low))
    return grid


def register_stage(modality: str) -> str:
    """The progress stage of one series' registration: ``register T1``, ``register T2``, ``register FLAIR``."""
    return f"register {NAMES[modality]}"


PREPARE_STAGES = ("read", *(register_stage(m) for m in MODALITIES if m != REFERENCE_MODALITY), "resample", "skull-strip")
"""The progress stages of ``prepare_case``, in order (``slicer_results.PREPARE_STAGE_SPANS`` maps them
onto the Slicer module's bar): each registration reports its resolution levels and the check of
its result (``registration.STEPS``), resampling each series onto the model grid, skull-stripping
each of BRAIN_CONTRASTS."""


def prepare_case(paths: dict[str, Path], device, progress: Callable[[str, int, int], None] = no_progress) -> PreparedCase:
    """Read, register, resample and skull-strip a raw case (``device``: a torch device, for the
    brain extraction); a KANTumorSegError naming the modality whose registration fails."""
    from .brain_extraction import BrainExtractor, require_prepare
    from .registration import register_rigid

    require_prepare()
    progress("read", 0, len(MODALITIES))
    with ThreadPoolExecutor(max_workers=len(MODALITIES)) as pool:
        images = dict(zip(MODALITIES, pool.map(lambda m: read_image(paths[m], m), MODALITIES)))
    check_distinct(images, paths)
    progress("read", len(MODALITIES), len(MODALITIES))

    reference = images[REFERENCE_MODALITY]
    grid = isotropic_grid(reference)
    on_grid = {REFERENCE_MODALITY: resample(reference, grid, sitk.Transform())}
    transforms: dict[str, sitk.Transform] = {REFERENCE_MODALITY: sitk.Transform()}
    registrations: dict[str, dict] = {}
    moving = [m for m in MODALITIES if m != REFERENCE_MODALITY]
    for m in moving:
        stage = register_stage(m)
        registration = register_rigid(on_grid[REFERENCE_MODALITY], images[m], NAMES[m],
                                      progress=lambda done, total, stage=stage: progress(stage, done, total))
        registrations[m] = registration.summary()
        transforms[m] = registration.transform

    # The T1ce was resampled first, as the registrations' fixed image.
    progress("resample", 1, len(MODALITIES))
    for done, m in enumerate(moving, start=2):
        on_grid[m] = resample(images[m], grid, transforms[m])
        progress("resample", done, len(MODALITIES))

    progress("skull-strip", 0, len(BRAIN_CONTRASTS))
    mask_on_grid = BrainExtractor(device).mask([on_grid[m] for m in BRAIN_CONTRASTS],
                                               lambda done: progress("skull-strip", done, len(BRAIN_CONTRASTS)))
    inside = sitk.GetArrayViewFromImage(mask_on_grid).astype(bool)
    channels = []
    for m in MODALITIES:
        values = sitk.GetArrayFromImage(on_grid[m])
        # Outside the brain every modality takes its minimum, the background the model saw.
        values[~inside] = values.min()
        channels.append(values)
    volume = np.stack(channels)
    raise_undershoot(volume)
    brain_mask = sitk.Resample(mask_on_grid, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    brain_ml = float(sitk.GetArrayViewFromImage(brain_mask).sum()) * float(np.prod(reference.GetSpacing())) / 1000.0
    report = {
        "registration": {"method": "rigid, Mattes mutual information, 3 levels (4, 2, 1 mm), onto the T1ce",
                         **registrations},
        "brain_extraction": {"tool": "deepbet", "contrasts": [NAMES[m] for m in BRAIN_CONTRASTS], "brain_volume_ml": round(brain_ml, 2)},
        "resampling": {"model_grid_spacing_mm": [ISOTROPIC_MM] * 3, "model_grid_size": list(grid.GetSize()),
                       "raw_t1ce_spacing_mm": [round(s, 4) for s in reference.GetSpacing()],
                       "raw_t1ce_size": list(reference.GetSize()),
                       "labels_to_raw_grid": "nearest neighbour"},
    }
    return PreparedCase(volume.transpose(0, 3, 2, 1), ModelGrid(reference, grid), brain_mask, images, transforms, report)


def resample(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform) -> sitk.Image:
    """float32 ``image`` on ``grid`` through ``transform`` (linear); outside it, the image's minimum."""
    background = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(image, grid, transform, sitk.sitkLinear, background, sitk.sitkFloat32)
