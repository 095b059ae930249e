"""A synthetic four-modality brain MRI with a simulated tumour, to run the pipeline anywhere.

``python -m KANTumorSegLib.phantom OUT_DIR`` writes ``phantom_{t1,t1ce,t2,flair}.nii.gz`` and
the tumour it simulated as ``phantom_seg.nii.gz`` (labels 0/1/2/4), laid out like a BraTS
case: skull-stripped, 1 mm, 240 x 240 x 155, LPS. The brain is an ellipsoid with a folded
cortex, sulcal CSF, ventricles, deep grey nuclei and an enhancing midline venous sinus; the
tumour is nested lobulated blobs: an enhancing rim around a necrotic core inside oedema,
each with the contrast it has in BraTS scans (ring enhancement on T1ce, bright oedema on
FLAIR and T2). It shows the pipeline running where no real case is
available; a model's output on it says nothing about the model's accuracy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .labels import ED, ET, NCR
from .preprocessing import MODALITIES

SHAPE = (240, 240, 155)

INTENSITY: dict[str, tuple[float, float, float, float]] = {
    "csf": (150.0, 160.0, 300.0, 60.0),
    "grey": (380.0, 400.0, 130.0, 200.0),
    "white": (500.0, 520.0, 90.0, 150.0),
    "edema": (330.0, 350.0, 220.0, 380.0),
    "enhancing": (380.0, 1000.0, 160.0, 300.0),
    "necrosis": (200.0, 220.0, 280.0, 180.0),
    "vessel": (300.0, 900.0, 100.0, 120.0),
}
"""Mean intensity of each tissue in T1, T1ce, T2 and FLAIR, on the scale of raw BraTS 2020 scans."""

NOISE = 0.02
"""Gaussian noise, as a fraction of each tissue's mean."""
TEXTURE = 0.04
"""Smooth intensity variation within a tissue, as a fraction of its mean."""


def _smooth_field(shape: tuple[int, int, int], sigma_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise blurred by sigma_mm and scaled to unit standard deviation."""
    import SimpleITK as sitk

    noise = sitk.GetImageFromArray(rng.standard_normal(shape, dtype=np.float32))
    field = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(noise, sigma_mm))
    return field / max(float(field.std()), 1e-6)


def _lobulated(distance: np.ndarray, angles: tuple[np.ndarray, np.ndarray], rng: np.random.Generator,
               strength: float = 1.0) -> np.ndarray:
    """A radial distance whose iso-surfaces are bumpy: divided by 1 + a few random angular waves
    (amplitudes up to 12% times ``strength``)."""
    azimuth, elevation = angles
    bumps = np.zeros_like(distance)
    for _ in range(3):
        k, phase, amplitude = rng.integers(2, 5), rng.uniform(0, 2 * np.pi), strength * rng.uniform(0.05, 0.12)
        bumps += amplitude * np.sin(k * azimuth + phase) * np.cos(rng.integers(1, 3) * elevation)
    return distance / (1.0 + bumps)


def make_phantom(shape: tuple[int, int, int] = SHAPE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """((4, X, Y, Z) float32 intensities in the order T1, T1ce, T2, FLAIR; (X, Y, Z) uint8
    labels 0/1/2/4), in the model-grid layout (x to the patient's left, y to posterior)."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    size = np.array(shape, dtype=float)
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) - (n - 1) / 2 for n in shape), indexing="ij")

    # Brain: an ellipsoid filling the field of view as a BraTS brain does; depth below its
    # surface in mm sets the layers. A smooth random field folds the cortex (gyri and sulci).
    radii = size * np.array([0.30, 0.36, 0.40])
    head_angles = (np.arctan2(y, x), np.arctan2(z, np.hypot(x, y)))
    brain_r = _lobulated(np.sqrt((x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2), head_angles, rng, 0.25)
    depth = (1.0 - brain_r) * float(radii.mean())
    folds = _smooth_field(shape, 2.5, rng)
    # Tissue codes: 0 outside the brain, then the index of the tissue in INTENSITY plus one.
    code = {name: i + 1 for i, name in enumerate(INTENSITY)}
    tissue = np.zeros(shape, dtype=np.uint8)
    tissue[depth > 0] = code["white"]
    tissue[(depth > 0) & (depth < 7.0 + 3.0 * folds)] = code["grey"]
    tissue[(depth > 0) & ((depth < 1.0) | ((folds > 1.0) & (depth < 8.0)))] = code["csf"]
    for side in (-1, 1):
        # Lateral ventricles, and the deep grey nuclei beside them.
        ventricle = ((x - side * 0.05 * size[0]) / (0.035 * size[0])) ** 2 + ((y + 0.02 * size[1]) / (0.13 * size[1])) ** 2 \
            + ((z - 0.05 * size[2]) / (0.10 * size[2])) ** 2
        nucleus = ((x - side * 0.11 * size[0]) / (0.04 * size[0])) ** 2 + ((y - 0.01 * size[1]) / (0.06 * size[1])) ** 2 \
            + ((z + 0.02 * size[2]) / (0.07 * size[2])) ** 2
        tissue[nucleus < 1.0] = code["grey"]
        tissue[ventricle < 1.0] = code["csf"]
    # Veins enhance on T1ce in every real scan: the superior sagittal sinus along the midline.
    tissue[(np.abs(x) < 2.0) & (depth > 0) & (depth < 4.0) & (z > -0.1 * size[2])] = code["vessel"]

    # Tumour in one hemisphere: oedema around an enhancing rim around a necrotic core.
    centre = size * np.array([0.13, -0.08, 0.08])
    radius = 0.085 * min(size[0], size[1])
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    tumour_angles = (np.arctan2(dy, dx), np.arctan2(dz, np.hypot(dx, dy)))
    tumour_r = _lobulated(np.sqrt(dx**2 + dy**2 + dz**2) / radius, tumour_angles, rng)
    inside = brain_r < 0.95
    labels = np.zeros(shape, dtype=np.uint8)
    for name, label, extent in (("edema", ED, 1.9), ("enhancing", ET, 1.0), ("necrosis", NCR, 0.6)):
        region = inside & (tumour_r < extent)
        tissue[region] = code[name]
        labels[region] = label

    brain = tissue > 0
    volume = np.zeros((len(MODALITIES), *shape), dtype=np.float32)
    # A smooth intensity bias across the head, as left by an MRI receive coil.
    bias = 1.0 + 0.08 * (x / size[0]) - 0.06 * (y / size[1]) + 0.05 * (z / size[2])
    for c in range(len(MODALITIES)):
        means = np.array([0.0] + [values[c] for values in INTENSITY.values()], dtype=np.float32)[tissue]
        # Partial volume at tissue borders: blur by about one voxel.
        blurred = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(means), 1.0))
        texture = 1.0 + TEXTURE * _smooth_field(shape, 1.5, rng)
        noisy = blurred * bias * texture * (1.0 + NOISE * rng.standard_normal(shape, dtype=np.float32))
        volume[c] = np.where(brain, np.clip(noisy, 1.0, None), 0.0)
    return volume, labels


def to_image(array: np.ndarray, pixel_type: int):
    """An (X, Y, Z) array as a BraTS-like SimpleITK image: 1 mm, LPS axes, BraTS origin."""
    import SimpleITK as sitk

    image = sitk.Cast(sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0))), pixel_type)
    image.SetSpacing((1.0, 1.0, 1.0))
    image.SetOrigin((0.0, -(array.shape[1] - 1.0), 0.0))
    return image


def write_phantom(out_dir: Path, case: str = "phantom", shape: tuple[int, int, int] = SHAPE, seed: int = 0) -> dict[str, Path]:
    """Write the four modalities and the simulated labels as ``<case>_<modality>.nii.gz``."""
    import SimpleITK as sitk

    volume, labels = make_phantom(shape, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for c, modality in enumerate(MODALITIES):
        paths[modality] = out_dir / f"{case}_{modality}.nii.gz"
        sitk.WriteImage(to_image(np.rint(volume[c]), sitk.sitkInt16), str(paths[modality]), useCompression=True)
    paths["seg"] = out_dir / f"{case}_seg.nii.gz"
    sitk.WriteImage(to_image(labels, sitk.sitkUInt8), str(paths["seg"]), useCompression=True)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m KANTumorSegLib.phantom", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write the phantom case into (created if missing)")
    parser.add_argument("--case", default="phantom", help="file name prefix (default: phantom)")
    parser.add_argument("--size", type=int, nargs=3, default=SHAPE, metavar=("X", "Y", "Z"),
                        help="voxels along left, posterior, superior (default: 240 240 155, as BraTS)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the shapes and the noise")
    args = parser.parse_args(argv)
    if min(args.size) < 8:
        parser.error("--size must be at least 8 voxels along each axis")
    try:
        paths = write_phantom(args.out_dir, args.case, tuple(args.size), args.seed)
    except OSError as error:
        print(f"phantom: error: could not write into {args.out_dir} ({error.strerror or error}).", file=sys.stderr)
        return 2
    print(f"Synthetic phantom written to {args.out_dir} (simulated tumour; not a real scan):")
    for path in paths.values():
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
