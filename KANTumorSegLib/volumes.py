"""Reading the four MRI volumes and moving them onto the model's grid and back.

The reference grid is the T1ce image's: the labelmap is written on it, and neurosurgeons
plan on T1ce. The model grid is the reference re-oriented so that array axes point to
the patient's left, posterior and superior (axial slices are ``array[:, :, z]``), with
1 mm in-plane spacing.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from .errors import KANTumorSegError
from .preprocessing import MODALITIES

if TYPE_CHECKING:
    from .dicom import Source

REFERENCE_MODALITY = "t1ce"
MODEL_SPACING_MM = 1.0
SPACING_TOLERANCE = 0.05
"""In-plane spacing within 5% of 1 mm is used as it is (no resampling)."""
GRID_TOLERANCE = 1e-3


def nifti_data_end(header: bytes) -> int | None:
    """Bytes a NIfTI-1 or NIfTI-2 file must hold (vox_offset + voxel data), from its header;
    None when the header is not NIfTI."""
    import struct

    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
        elif len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
        else:
            continue
        if not 1 <= dims[0] <= 7:
            return None
        return offset + int(np.prod([max(d, 1) for d in dims[1:dims[0] + 1]], dtype=np.int64)) * bitpix // 8
    return None


def check_nifti_complete(path: Path, label: str) -> None:
    """Refuse a NIfTI file shorter than its header announces, or a broken gzip stream.

    ITK reads a truncated .nii or .nii.gz without any error and fills the missing voxels
    with zeros, which would silently segment half a head.
    """
    import gzip
    import zlib

    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    with open(path, "rb") as stream:
        # ITK also reads an uncompressed file named .nii.gz: only a gzip stream is decompressed.
        compressed = stream.read(2) == b"\x1f\x8b"
    try:
        if compressed:
            with gzip.open(path, "rb") as stream:
                header = stream.read(544)
                size = len(header) + sum(len(block) for block in iter(lambda: stream.read(1 << 22), b""))
        else:
            with open(path, "rb") as stream:
                header = stream.read(544)
            size = path.stat().st_size
    except (EOFError, OSError, zlib.error) as error:
        raise KANTumorSegError(f"The {label} file {path} is truncated or corrupt ({error}).") from None
    expected = nifti_data_end(header)
    if expected is not None and size < expected:
        raise KANTumorSegError(
            f"The {label} file {path} is truncated: it holds {size} bytes of the {expected} its header announces.")


def read_image(path: Source, modality: str) -> sitk.Image:
    """Read one 3D scalar image (a file, or a DICOM series), with a clear error naming it when it cannot be used."""
    from .dicom import DicomSeries, read_series

    label = modality.upper()
    try:
        image = read_series(path) if isinstance(path, DicomSeries) else sitk.ReadImage(str(path))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
        raise KANTumorSegError(
            f"The {label} file {path} could not be read as an image (corrupt, truncated or not an image file): {reason.strip()}") from None
    if not isinstance(path, DicomSeries):
        check_nifti_complete(path, label)
    if image.GetNumberOfComponentsPerPixel() != 1:
        components = image.GetNumberOfComponentsPerPixel()
        raise KANTumorSegError(f"The {label} file {path} has {components} components per voxel; a scalar 3D volume is needed.")
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise KANTumorSegError(f"The {label} file {path} is {image.GetDimension()}D {image.GetSize()}; a 3D volume is needed.")
    if min(image.GetSize()) < 2:
        raise KANTumorSegError(f"The {label} file {path} has size {image.GetSize()}; a 3D volume is needed, not a single slice.")
    image = sitk.Cast(image, sitk.sitkFloat32)
    array = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(array)
    if not finite.all():
        bad = int((~finite).sum())
        if bad == array.size:
            raise KANTumorSegError(f"The {label} file {path} holds no finite voxel values.")
        warnings.warn(f"The {label} file {path} has {bad} NaN or infinite voxels; they were set to the volume minimum.", stacklevel=2)
        cleaned = np.where(finite, array, np.nanmin(np.where(finite, array, np.nan)))
        fixed = sitk.GetImageFromArray(cleaned.astype(np.float32))
        fixed.CopyInformation(image)
        image = fixed
        array = cleaned
    if float(array.max()) == float(array.min()):
        raise KANTumorSegError(f"The {label} file {path} is constant (every voxel {float(array.min()):g}); it holds no image.")
    return image


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """True when both images have the same size, spacing, origin and direction."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=GRID_TOLERANCE)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=GRID_TOLERANCE * max(a.GetSpacing()))
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=GRID_TOLERANCE))


def physical_bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper corner (LPS, mm) of the image's voxel extent."""
    size = np.array(image.GetSize())
    corners = [image.TransformContinuousIndexToPhysicalPoint([float(c) for c in (np.array(bits) * (size - 1))])
               for bits in np.ndindex(2, 2, 2)]
    corners = np.array(corners)
    return corners.min(axis=0), corners.max(axis=0)


def overlap_fraction(moving: sitk.Image, reference: sitk.Image) -> float:
    """Fraction of the reference's bounding box that the moving image's box covers."""
    lo_m, hi_m = physical_bounds(moving)
    lo_r, hi_r = physical_bounds(reference)
    inter = np.clip(np.minimum(hi_m, hi_r) - np.maximum(lo_m, lo_r), 0, None)
    extent = np.maximum(hi_r - lo_r, 1e-6)
    return float(np.prod(inter / extent))


def resample_like(image: sitk.Image, reference: sitk.Image, interpolator: int = sitk.sitkLinear,
                  default: float = 0.0) -> sitk.Image:
    """Image on the reference grid (identity transform, physical space)."""
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, default, image.GetPixelID())


def align_to_reference(images: dict[str, sitk.Image], paths: dict[str, Source]) -> dict[str, sitk.Image]:
    """Put every modality on the T1ce grid: identical grids pass, overlapping grids are
    resampled with a warning, grids that do not overlap are refused."""
    reference = images[REFERENCE_MODALITY]
    aligned = {}
    for modality, image in images.items():
        if modality == REFERENCE_MODALITY or same_grid(image, reference):
            aligned[modality] = image
            continue
        overlap = overlap_fraction(image, reference)
        if overlap < 0.5:
            raise KANTumorSegError(
                f"The {modality.upper()} file {paths[modality]} does not overlap the T1ce image in space "
                f"({overlap:.0%} of its extent); the four modalities must show the same head, co-registered.")
        warnings.warn(f"The {modality.upper()} image {paths[modality].name} is on another grid than T1ce "
                      f"(size {image.GetSize()}, spacing {tuple(round(s, 3) for s in image.GetSpacing())}); "
                      "it was resampled onto the T1ce grid.", stacklevel=2)
        # Voxels outside the moving image take its minimum, i.e. background.
        background = float(sitk.GetArrayViewFromImage(image).min())
        aligned[modality] = resample_like(image, reference, sitk.sitkLinear, background)
    return aligned


@dataclass
class ModelGrid:
    """The reference image re-oriented to LPS axes and, if needed, resampled to 1 mm in-plane."""

    reference: sitk.Image
    grid: sitk.Image

    @property
    def resampled(self) -> bool:
        return not same_grid(self.grid, sitk.DICOMOrient(self.reference, "LPS"))


def model_grid(reference: sitk.Image) -> ModelGrid:
    """The grid the model sees: LPS-oriented axes, 1 mm in-plane, the reference's extent."""
    oriented = sitk.DICOMOrient(reference, "LPS")
    spacing = np.array(oriented.GetSpacing())
    if np.all(np.abs(spacing[:2] - MODEL_SPACING_MM) <= SPACING_TOLERANCE * MODEL_SPACING_MM):
        return ModelGrid(reference, oriented)
    new_spacing = (MODEL_SPACING_MM, MODEL_SPACING_MM, float(spacing[2]))
    size = np.array(oriented.GetSize())
    new_size = [max(1, int(round(size[i] * spacing[i] / new_spacing[i]))) for i in range(2)] + [int(size[2])]
    # Keep the physical centre of the first voxel row aligned with the field of view.
    origin_shift = [(new_spacing[i] - spacing[i]) / 2 for i in range(2)] + [0.0]
    direction = np.array(oriented.GetDirection()).reshape(3, 3)
    origin = np.array(oriented.GetOrigin()) + direction @ np.array(origin_shift)
    grid = sitk.Image([int(s) for s in new_size], sitk.sitkUInt8)
    grid.SetSpacing(new_spacing)
    grid.SetOrigin(tuple(float(o) for o in origin))
    grid.SetDirection(oriented.GetDirection())
    return ModelGrid(reference, grid)


def on_model_grid(image: sitk.Image, grid: sitk.Image) -> sitk.Image:
    """The image on the model grid: itself, reoriented to LPS, or resampled (linear)."""
    if same_grid(image, grid):
        return image
    oriented = sitk.DICOMOrient(image, "LPS")
    if same_grid(oriented, grid):
        return oriented
    background = float(sitk.GetArrayViewFromImage(image).min())
    return resample_like(image, grid, sitk.sitkLinear, background)


def to_model_array(image: sitk.Image, grid: sitk.Image) -> np.ndarray:
    """(X, Y, Z) float32 array of the image on the model grid (x: left, y: posterior): a
    transposed view of ITK's (Z, Y, X) array, so an axial slice stays one contiguous plane."""
    return sitk.GetArrayFromImage(on_model_grid(image, grid)).astype(np.float32, copy=False).transpose(2, 1, 0)


def labels_to_reference(labels: np.ndarray, grid: ModelGrid) -> sitk.Image:
    """An (X, Y, Z) labelmap on the model grid as a uint8 image on the reference grid
    (nearest neighbour, exact where only the orientation differs)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels.transpose(2, 1, 0)).astype(np.uint8))
    image.CopyInformation(grid.grid)
    if same_grid(image, grid.reference):
        return image
    return resample_like(image, grid.reference, sitk.sitkNearestNeighbor, 0)


def check_distinct(images: dict[str, sitk.Image], paths: dict[str, Source]) -> None:
    """Refuse two modalities with identical voxels: one series exported twice under two
    names, which the model would take for two contrasts without any error."""
    seen: list[str] = []
    for modality, image in images.items():
        for other in seen:
            twin = images[other]
            if (twin.GetSize() == image.GetSize()
                    and np.array_equal(sitk.GetArrayViewFromImage(twin), sitk.GetArrayViewFromImage(image))):
                raise KANTumorSegError(
                    f"The {other.upper()} file {paths[other]} and the {modality.upper()} file {paths[modality]} hold the "
                    "same image (identical voxels); one modality was exported twice, each needs its own series.")
        seen.append(modality)


def load_case(paths: dict[str, Source]) -> tuple[np.ndarray, ModelGrid]:
    """Read and align the four modalities: a (4, X, Y, Z) model-grid array (a view of a
    (4, Z, Y, X) C-ordered array) and its grid."""
    from concurrent.futures import ThreadPoolExecutor

    # The four files in parallel: gzip inflation (ITK's and the completeness check's) releases
    # the GIL, and it was most of the read. map keeps the modality order, so the first file at
    # fault in that order is the one reported.
    with ThreadPoolExecutor(max_workers=len(MODALITIES)) as pool:
        images = dict(zip(MODALITIES, pool.map(lambda m: read_image(paths[m], m), MODALITIES)))
    check_distinct(images, paths)
    aligned = align_to_reference(images, paths)
    grid = model_grid(aligned[REFERENCE_MODALITY])
    # One copy, in ITK's (Z, Y, X) memory order, viewed as (4, X, Y, Z): transposing copies
    # (to X, Y, Z, then back to axial planes for the model) took 0.3 s of a 1.2 s GPU command.
    on_grid = [on_model_grid(aligned[m], grid.grid) for m in MODALITIES]
    volume = np.stack([sitk.GetArrayViewFromImage(image) for image in on_grid]).astype(np.float32, copy=False)
    raise_undershoot(volume)
    return volume.transpose(0, 3, 2, 1), grid


def raise_undershoot(volume: np.ndarray) -> None:
    """Raise, in place, each modality's voxels below its background value to that value.

    Registration pipelines that resample with spline or windowed-sinc kernels (BraTS Toolkit,
    ANTs, FSL) ring below the zero background around the brain: a real TCGA case had 5,528
    negative T2 voxels on 78 of 155 slices. Preprocessing takes each slice's minimum as its
    background, so those voxels would lift the whole background above -1 (91.5 mL of whole
    tumour against 76.6 mL clipped at 0) and wash out the overview. The background is the most
    common value (0 on such volumes); only a modality whose minimum is negative is looked at,
    so a BraTS volume (minimum 0) costs one pass, and a z-scored one (its background is its
    minimum) is left as it is.
    """
    for channel in volume:
        if channel.min() >= 0:
            continue
        sample = channel.ravel()[:: max(1, channel.size // 1_000_000)]
        values, counts = np.unique(sample, return_counts=True)
        np.maximum(channel, values[counts.argmax()], out=channel)
