"""The overview PNG: the slice it chooses, its titles, orientation marks and legend, and the font that draws them."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from KANTumorSegLib.bitmap_text import draw_text, text_mask, text_size
from KANTumorSegLib.labels import ED, ET, NCR
from KANTumorSegLib.measurements import tumour_volumes
from KANTumorSegLib.overview import GAP, legend_items, most_tumour_slice, segment_rgb, write_overview


def test_the_slice_with_the_most_tumour_voxels_is_chosen_not_the_highest_labels():
    labels = np.zeros((20, 20, 9), dtype=np.uint8)
    labels[:10, :10, 2] = ET  # 100 voxels of label 4
    labels[:15, :10, 6] = ED  # 150 voxels of label 2: more voxels, smaller label sum (300 < 400)
    labels[:5, :5, 7] = NCR
    assert most_tumour_slice(labels) == 6


def test_a_tie_takes_the_first_slice_and_no_tumour_the_middle_one():
    labels = np.zeros((8, 8, 9), dtype=np.uint8)
    assert most_tumour_slice(labels) == 4
    labels[:3, :3, 5] = ED
    labels[5:, 5:, 3] = ET
    assert most_tumour_slice(labels) == 3


def test_legend_names_the_slice_and_each_segment_with_its_volume():
    labels = np.zeros((10, 10, 5), dtype=np.uint8)
    labels[:2, :2, 1] = NCR  # 4 voxels
    labels[:3, :3, 2] = ED  # 9 voxels
    labels[0, 0, 3] = ET  # 1 voxel
    items = legend_items(2, 5, tumour_volumes(labels, (2.0, 2.0, 2.5)))  # 0.01 mL per voxel
    assert items == [(None, "Axial slice 2 (0-4), most tumour"),
                     (segment_rgb(NCR), "Necrotic core 0.0 mL"),
                     (segment_rgb(ED), "Edema 0.1 mL"),
                     (segment_rgb(ET), "Enhancing 0.0 mL"),
                     (None, "Whole tumour 0.1 mL")]


def test_the_png_shows_the_chosen_slice_with_titles_marks_and_legend_swatches(tmp_path):
    x, y, z = 200, 180, 12
    rng = np.random.default_rng(0)
    volume = rng.normal(100, 10, size=(4, x, y, z)).astype(np.float32)
    labels = np.zeros((x, y, z), dtype=np.uint8)
    labels[80:120, 60:100, 7] = ED
    labels[90:110, 70:90, 7] = ET
    labels[95:100, 75:80, 7] = NCR
    labels[10:20, 10:20, 3] = ED
    path = tmp_path / "overview.png"
    assert write_overview(path, volume, labels, tumour_volumes(labels, (1.0, 1.0, 1.0))) == 7

    image = sitk.ReadImage(str(path))
    pixels = sitk.GetArrayFromImage(image)
    assert image.GetNumberOfComponentsPerPixel() == 3
    assert pixels.shape[1] == 5 * x + 4 * GAP
    title_band = pixels[:26]  # 7-pixel glyphs at scale 2 with 6 pixels above and below
    for panel in range(5):
        left = panel * (x + GAP)
        assert (title_band[:, left:left + x] == 255).all(-1).any(), f"panel {panel} has no title"
    # The legend (below the panels) holds a swatch of every segment's colour.
    legend = pixels[26 + y:]
    for label in (NCR, ED, ET):
        assert (legend == segment_rgb(label)).all(-1).sum() >= 14 * 14
    # The orientation marks are yellow, on each panel.
    marks = (pixels[..., 0] == 255) & (pixels[..., 1] == 255) & (pixels[..., 2] == 0)
    for panel in range(5):
        assert marks[:, panel * (x + GAP): panel * (x + GAP) + x].any()


def test_text_has_the_size_it_announces_and_unknown_characters_show_as_a_question_mark():
    assert text_size("T1ce", 2) == (14, (4 * 6 - 1) * 2)
    assert text_mask("T1ce", 2).shape == text_size("T1ce", 2)
    assert (text_mask("\u00b5", 1) == text_mask("?", 1)).all()
    assert not text_mask(" ", 1).any() and text_mask("A", 1).any()


def test_text_is_clipped_at_the_canvas_edges():
    canvas = np.zeros((10, 10, 3), dtype=np.uint8)
    draw_text(canvas, "LONG TEXT", -3, 4, 1, outline=True)
    draw_text(canvas, "A", 50, 50, 1)
    assert canvas.any() and canvas.shape == (10, 10, 3)
