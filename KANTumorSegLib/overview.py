"""The one-look PNG a user opens first: the axial slice with the most tumour, labelled.

Five panels side by side: T1, T1ce, T2, FLAIR and FLAIR with the segmentation, each titled and
marked with the patient's orientation (radiological display: anterior up, the patient's right
on the left). Below them a legend: the slice's number and each segment's colour and volume,
so that a wrong modality order or an implausible volume shows at a glance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .bitmap_text import GLYPH_ROWS, draw_text, text_size
from .labels import SEGMENTS

GAP = 12
"""Pixels between two panels: room for one panel's L mark to stand apart from the next one's R."""

PANEL_TITLES = ("T1", "T1ce", "T2", "FLAIR", "Segmentation")

LEGEND_NAMES = {"NCR": "Necrotic core", "ED": "Edema", "ET": "Enhancing"}
"""Short legend names of the segments (their full names are in the .seg.nrrd and the volumes table)."""


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
    """Axial index with the most tumour voxels (the first such slice on a tie; the middle slice
    when there is no tumour). Voxels are counted, not label values, so a slice of much edema
    (2) wins over one of a little enhancing tumour (4)."""
    counts = (labels > 0).sum(axis=(0, 1))
    return int(counts.argmax()) if counts.any() else labels.shape[2] // 2


def segment_rgb(label: int) -> tuple[int, int, int]:
    """The 0-255 colour of a tumour class, as the overlay and the .seg.nrrd show it."""
    color = next(s.color for s in SEGMENTS if s.label == label)
    return tuple(int(round(255 * c)) for c in color)


def legend_items(z: int, depth: int, volumes: dict) -> list[tuple[tuple[int, int, int] | None, str]]:
    """(swatch colour or None, text) of each legend entry: the slice, then each segment's volume
    and the whole tumour's. ``volumes`` is the run's volume table (``measurements.tumour_volumes``)."""
    ml = {row["name"]: row["volume_ml"] for row in volumes["regions"]}
    items: list[tuple[tuple[int, int, int] | None, str]] = [(None, f"Axial slice {z} (0-{depth - 1}), most tumour")]
    items += [(segment_rgb(s.label), f"{LEGEND_NAMES[s.id]} {ml[s.id]:.1f} mL") for s in SEGMENTS]
    items.append((None, f"Whole tumour {ml['WT']:.1f} mL"))
    return items


def _legend_rows(items: list, width: int, scale: int) -> list[list[tuple[int, tuple | None, str]]]:
    """The items laid out left to right, wrapped at ``width``: per row, (left, colour, text)."""
    swatch, space = GLYPH_ROWS * scale, 4 * scale
    rows: list[list[tuple[int, tuple | None, str]]] = [[]]
    left = space
    for color, text in items:
        item_width = (swatch + scale * 2 if color else 0) + text_size(text, scale)[1]
        if rows[-1] and left + item_width > width:
            rows.append([])
            left = space
        rows[-1].append((left, color, text))
        left += item_width + 3 * space
    return rows


def _mark_orientation(canvas: np.ndarray, top: int, left: int, rows: int, cols: int, scale: int) -> None:
    """A, P, R and L at the panel's edges, for the radiological display of an LPS slice."""
    height, width = text_size("A", scale)
    margin = 2 * scale
    marks = (("A", top + margin, left + (cols - width) // 2), ("P", top + rows - height - margin, left + (cols - width) // 2),
             ("R", top + (rows - height) // 2, left + margin), ("L", top + (rows - height) // 2, left + cols - width - margin))
    for letter, row, col in marks:
        draw_text(canvas, letter, row, col, scale, color=(255, 255, 0), outline=True)


def write_overview(path: Path, volume: np.ndarray, labels: np.ndarray, volumes: dict) -> int:
    """Write the overview PNG of a case on the model grid (``volume`` (4, X, Y, Z), ``labels``
    (X, Y, Z), LPS axes) with the legend from ``volumes``; returns the slice index shown."""
    z = most_tumour_slice(labels)
    grays = [_gray(volume[c, :, :, z]) for c in range(volume.shape[0])]
    panels = [np.repeat(g[..., None], 3, axis=2) for g in grays]
    panels.append(overlay(grays[3], labels[:, :, z].T))
    rows, cols = panels[0].shape[:2]
    scale = 2 if cols >= 160 else 1
    pad = 3 * scale
    line = GLYPH_ROWS * scale + 2 * pad
    width = len(panels) * cols + (len(panels) - 1) * GAP
    legend = _legend_rows(legend_items(z, labels.shape[2], volumes), width, scale)
    canvas = np.zeros((line + rows + len(legend) * line, width, 3), dtype=np.uint8)
    for i, (panel, title) in enumerate(zip(panels, PANEL_TITLES)):
        left = i * (cols + GAP)
        canvas[line:line + rows, left:left + cols] = panel
        draw_text(canvas, title, pad, left + max((cols - text_size(title, scale)[1]) // 2, 0), scale)
        _mark_orientation(canvas, line, left, rows, cols, scale)
    for r, entries in enumerate(legend):
        top = line + rows + r * line + pad
        for left, color, text in entries:
            if color:
                canvas[top:top + GLYPH_ROWS * scale, left:left + GLYPH_ROWS * scale] = color
                left += GLYPH_ROWS * scale + 2 * scale
            draw_text(canvas, text, top, left, scale)
    sitk.WriteImage(sitk.GetImageFromArray(canvas, isVector=True), str(path))
    return z
