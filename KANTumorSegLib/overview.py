"""A one-look PNG: the axial slice with the most tumour, four modalities and the overlay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .labels import SEGMENTS

GAP = 4


def _gray(slice_: np.ndarray) -> np.ndarray:
    """(X, Y) -> (rows, cols) uint8 in radiological display (anterior up, patient's right on the left)."""
    low, high = np.percentile(slice_, [0.5, 99.5])
    scaled = np.clip((slice_ - low) / max(high - low, 1e-6), 0, 1)
    return (scaled.T * 255).astype(np.uint8)


def overlay(gray: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Colour each tumour class over a grey image (both in display layout)."""
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    for segment in SEGMENTS:
        mask = labels == segment.label
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * 255 * np.array(segment.color)
    return rgb.astype(np.uint8)


def most_tumour_slice(labels: np.ndarray) -> int:
    """Axial index with the most tumour voxels (the middle slice when there is none)."""
    counts = (labels > 0).sum(axis=(0, 1))
    return int(counts.argmax()) if counts.any() else labels.shape[2] // 2


def write_overview(path: Path, volume: np.ndarray, labels: np.ndarray) -> int:
    """T1, T1ce, T2, FLAIR and FLAIR with the segmentation, side by side; returns the slice index."""
    z = most_tumour_slice(labels)
    grays = [_gray(volume[c, :, :, z]) for c in range(volume.shape[0])]
    panels = [np.repeat(g[..., None], 3, axis=2) for g in grays]
    panels.append(overlay(grays[3], labels[:, :, z].T))
    rows, cols = panels[0].shape[:2]
    canvas = np.zeros((rows, len(panels) * cols + (len(panels) - 1) * GAP, 3), dtype=np.uint8)
    for i, panel in enumerate(panels):
        canvas[:, i * (cols + GAP): i * (cols + GAP) + cols] = panel
    sitk.WriteImage(sitk.GetImageFromArray(canvas, isVector=True), str(path))
    return z
