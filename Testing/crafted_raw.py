"""Raw-scanner-like cases crafted from a co-registered BraTS case, with the truth known.

Each modality is moved by a known rigid transform (the patient moving between series) and
resliced into thick, tilted axial slabs (0.9 x 0.9 x 5.5 mm, as scanners store 2D series), each
on its own grid. ``--prepare`` must undo the movement: the tests compare its registrations with
the known transforms, and its outputs with the expert labels moved onto the raw T1ce grid.
Written into a test's tmp folder, never committed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

SLAB_SPACING = (0.9, 0.9, 5.5)

MOVES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float], float]] = {
    "t1ce": ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), 8.0),
    "t1": ((3.0, -2.0, 4.0), (4.0, -3.0, 2.0), 0.0),
    "t2": ((-5.0, 2.0, -3.0), (-6.0, 5.0, -4.0), -12.0),
    "flair": ((6.0, 4.0, 2.0), (3.0, 8.0, -6.0), 15.0),
}
"""Per modality: the head's rotation (degrees about L, P, S), its translation (mm) and the slab
grid's tilt about the left-right axis (degrees). The T1ce stays put, on a tilted grid."""


def rigid(angles_deg: tuple[float, float, float], translation: tuple[float, float, float], center) -> sitk.Euler3DTransform:
    """A rigid transform about ``center`` (LPS mm)."""
    transform = sitk.Euler3DTransform()
    transform.SetCenter(tuple(float(c) for c in center))
    transform.SetRotation(*(float(np.radians(a)) for a in angles_deg))
    transform.SetTranslation(tuple(float(t) for t in translation))
    return transform


def image_center(image: sitk.Image) -> tuple[float, ...]:
    return image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in image.GetSize()])


def slab_grid(image: sitk.Image, tilt_deg: float, spacing=SLAB_SPACING) -> sitk.Image:
    """A grid of thick axial slabs tilted about the left-right axis, covering the image's extent."""
    angle = np.radians(tilt_deg)
    direction = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    direction = np.array(image.GetDirection()).reshape(3, 3) @ direction
    extent = np.array(image.GetSize()) * np.array(image.GetSpacing())
    # Tilted, the box must be larger to hold the whole head.
    size = [int(np.ceil(e * 1.15 / s)) for e, s in zip(extent, spacing)]
    center = np.array(image_center(image))
    origin = center - direction @ ((np.array(size) - 1) * np.array(spacing) / 2)
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing(tuple(float(s) for s in spacing))
    grid.SetDirection(tuple(float(d) for d in direction.ravel()))
    grid.SetOrigin(tuple(float(o) for o in origin))
    return grid


SUB_SLICES = 5


def slab_average(image: sitk.Image, grid: sitk.Image, move: sitk.Transform) -> sitk.Image:
    """``image`` seen through ``move`` on the slab ``grid``, each slab the mean of SUB_SLICES thin
    slices across its thickness (a point sample would alias what a real slab averages)."""
    spacing = np.array(grid.GetSpacing())
    thin = spacing[2] / SUB_SLICES
    direction = np.array(grid.GetDirection()).reshape(3, 3)
    fine = sitk.Image([grid.GetSize()[0], grid.GetSize()[1], grid.GetSize()[2] * SUB_SLICES], sitk.sitkFloat32)
    fine.SetSpacing((float(spacing[0]), float(spacing[1]), float(thin)))
    fine.SetDirection(grid.GetDirection())
    fine.SetOrigin(tuple(float(o) for o in np.array(grid.GetOrigin()) - direction @ np.array([0, 0, thin * (SUB_SLICES - 1) / 2])))
    values = sitk.GetArrayFromImage(sitk.Resample(image, fine, move, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    slabs = values.reshape(grid.GetSize()[2], SUB_SLICES, *values.shape[1:]).mean(axis=1)
    out = sitk.GetImageFromArray(slabs)
    out.CopyInformation(grid)
    return out


def craft_raw_case(case_dir: Path, out: Path, name: str = "raw", moves=MOVES) -> dict[str, sitk.Euler3DTransform]:
    """Write ``out/<name>_<modality>.nii.gz`` (int16, each on its own slab grid) and
    ``out/../<name>_seg_truth.nii.gz`` (the expert labels on the raw T1ce grid, outside the case
    folder); returns, per modality, the transform that maps raw T1ce space into that series."""
    out.mkdir(parents=True, exist_ok=True)
    files = {p.name.split("_")[-1].split(".")[0]: p for p in case_dir.glob("*.nii.gz")}
    center = image_center(sitk.ReadImage(str(files["t1ce"])))
    head_moves = {m: rigid(angles, shift, center) for m, (angles, shift, _) in moves.items()}
    truths: dict[str, sitk.Euler3DTransform] = {}
    reference_grid = None
    for modality, (_, _, tilt) in moves.items():
        image = sitk.ReadImage(str(files[modality]), sitk.sitkFloat32)
        grid = slab_grid(image, tilt)
        # The series sees the head moved by ``move``: its voxel at p shows what the BraTS
        # volume holds at move(p), averaged across the slab's thickness as a scanner's slice is.
        raw = sitk.Cast(slab_average(image, grid, head_moves[modality]), sitk.sitkInt16)
        sitk.WriteImage(raw, str(out / f"{name}_{modality}.nii.gz"), useCompression=True)
        # Fixed (T1ce) point p shows BraTS point move_t1ce(p); the series shows it at move_m^-1 of that.
        truth = sitk.CompositeTransform([head_moves[modality].GetInverse(), head_moves["t1ce"]])
        truths[modality] = truth
        if modality == "t1ce":
            reference_grid = raw
    seg = sitk.ReadImage(str(files["seg"]))
    seg_raw = sitk.Resample(seg, reference_grid, head_moves["t1ce"], sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    sitk.WriteImage(seg_raw, str(out.parent / f"{name}_seg_truth.nii.gz"), useCompression=True)
    return truths


def edge_error_mm(found: sitk.Transform, truth: sitk.Transform, brain: sitk.Image, step: int = 2) -> float:
    """Largest distance (mm) between where ``found`` and ``truth`` send the brain's edge points
    (``brain`` a binary mask in fixed space, looked at on every ``step``-th voxel)."""
    mask = sitk.GetArrayFromImage(brain).astype(bool)
    inner = sitk.GetArrayFromImage(sitk.BinaryErode(brain, [1, 1, 1])).astype(bool)
    edge = np.argwhere((mask & ~inner)[::step, ::step, ::step]) * step
    worst = 0.0
    for z, y, x in edge:
        p = brain.TransformIndexToPhysicalPoint((int(x), int(y), int(z)))
        worst = max(worst, float(np.linalg.norm(np.array(found.TransformPoint(p)) - np.array(truth.TransformPoint(p)))))
    return worst
