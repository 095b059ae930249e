"""Per-slice preprocessing invariants on real BraTS slices."""

from __future__ import annotations

import numpy as np
import pytest

from KANTumorSegLib.preprocessing import (
    MODALITIES,
    CropBox,
    PreprocessingConfig,
    brain_crop_box,
    crop,
    paste,
    preprocess_slice,
    scale_intensities,
)

CONFIG = PreprocessingConfig()


@pytest.fixture(scope="module")
def raw_001(case_paths) -> np.ndarray:
    """BraTS20_Training_001 as (4, X, Y, Z) float32, channels T1, T1ce, T2, FLAIR, read with
    nibabel (whose get_fdata layout is the model layout for BraTS files)."""
    import nibabel as nib

    files = case_paths["BraTS20_Training_001"]
    return np.stack([np.asarray(nib.load(str(files[m])).get_fdata(), dtype=np.float32) for m in MODALITIES])


def test_gamma_is_applied_to_the_unit_range_then_mapped_to_minus_one_one():
    slice_ = np.stack([np.linspace(10, 20, 12, dtype=np.float32).reshape(3, 4)] * 4)
    config = PreprocessingConfig(gamma=(1.0, 1.5, 2.0, 0.5))
    u = (slice_[0] - 10) / 10
    out = scale_intensities(slice_, config)
    for c, gamma in enumerate(config.gamma):
        np.testing.assert_allclose(out[c], 2 * u**gamma - 1, atol=1e-6)
    assert out.min() == -1.0 and out.max() == 1.0


def test_min_max_scaling_ignores_positive_affine_intensity_change(raw_001):
    slice_ = raw_001[..., 80]
    scale = np.array([0.01, 3.0, 250.0, 0.5], dtype=np.float64).reshape(4, 1, 1)
    shift = np.array([-7.0, 100.0, -3.0, 0.0], dtype=np.float64).reshape(4, 1, 1)
    changed = (slice_.astype(np.float64) * scale + shift).astype(np.float32)
    original_input, original_box = preprocess_slice(slice_, CONFIG)
    changed_input, changed_box = preprocess_slice(changed, CONFIG)
    assert original_box == changed_box
    np.testing.assert_allclose(changed_input, original_input, atol=2e-5)
    assert original_input.shape == (4, 224, 224)


@pytest.fixture(params=["000001", "000004", "000006"])
def wolleb_slices(brats_samples, request) -> tuple[int, np.ndarray]:
    """The four JuliaWolleb_Diffusion-based-Segmentation modalities of one slice of
    BraTS20_Training_001, transposed back into the model layout: (slice file index, (4, X, Y))."""
    import nibabel as nib

    folder = brats_samples / "JuliaWolleb_Diffusion-based-Segmentation" / "training" / request.param
    files = {m: next(folder.glob(f"brats_train_001_{m}_*_w.nii.gz")) for m in MODALITIES}
    stored = np.stack([np.asarray(nib.load(str(files[m])).get_fdata(), dtype=np.float64) for m in MODALITIES])
    return int(files["t1ce"].name.split("_")[-2]), stored.transpose(0, 2, 1)


def test_wolleb_slice_is_found_in_the_raw_volume_and_gives_the_same_model_input(raw_001, wolleb_slices):
    """The 2D Wolleb slices are the raw slice clipped to a per-volume intensity window
    [lo, hi] and mapped affinely onto [0, 1] (checked here: the data README calls them only
    "min-max scaled"). Min-max scaling is blind to the affine map, so the model input from the
    Wolleb slice equals the one from the raw NIfTI slice clipped to the same window."""
    file_index, wolleb = wolleb_slices
    # Which axial slice it is: the one whose T1ce correlates best with the Wolleb T1ce.
    t1ce = raw_001[1].reshape(-1, raw_001.shape[3])
    correlations = [np.corrcoef(t1ce[:, z], wolleb[1].ravel())[0, 1] if t1ce[:, z].std() else -1 for z in range(t1ce.shape[1])]
    z = int(np.argmax(correlations))
    assert z == file_index and correlations[z] > 0.98
    raw = raw_001[..., z].astype(np.float64)

    clipped = np.empty_like(raw)
    for c in range(4):
        # The window from the unclipped voxels, where wolleb = (raw - lo) / (hi - lo) exactly.
        inside = (wolleb[c] > 0) & (wolleb[c] < 1)
        slope, intercept = np.polyfit(raw[c][inside], wolleb[c][inside], 1)
        np.testing.assert_allclose(slope * raw[c][inside] + intercept, wolleb[c][inside], atol=1e-9)
        lo, hi = -intercept / slope, (1 - intercept) / slope
        clipped[c] = np.clip(raw[c], lo, hi)

    from_wolleb, box_wolleb = preprocess_slice(wolleb.astype(np.float32), CONFIG)
    from_raw, box_raw = preprocess_slice(clipped.astype(np.float32), CONFIG)
    assert box_wolleb == box_raw
    np.testing.assert_allclose(from_wolleb, from_raw, atol=1e-4)


def test_crop_and_paste_round_trip():
    rng = np.random.default_rng(0)
    image = rng.integers(1, 5, size=(150, 170)).astype(np.uint8)
    for box in (CropBox(10, 20, 64), CropBox(-30, 140, 64), CropBox(120, -5, 64)):
        window = crop(image, box, fill=0)
        back = paste(window, box, image.shape)
        inside = np.zeros(image.shape, dtype=bool)
        inside[max(box.x0, 0):box.x0 + box.size, max(box.y0, 0):box.y0 + box.size] = True
        np.testing.assert_array_equal(back[inside], image[inside])
        assert not back[~inside].any()


def test_brain_near_the_edge_is_padded_with_minus_one(raw_001):
    slice_ = raw_001[..., 80]
    # Move the brain against the left edge of a slice (x = 0), as in a tight field of view.
    xs = np.nonzero(slice_.any(axis=(0, 2)))[0]
    shifted = np.zeros_like(slice_)
    width = slice_.shape[1] - xs[0]
    shifted[:, :width] = slice_[:, xs[0]:]
    model_input, box = preprocess_slice(shifted, CONFIG)
    assert box.x0 < 0
    pad = -box.x0
    assert np.all(model_input[:, :pad] == -1.0)
    # The unpadded part is the scaled slice itself.
    source, target = box.source_and_target(shifted.shape[1:])
    np.testing.assert_array_equal(model_input[(slice(None), *target)], scale_intensities(shifted, CONFIG)[(slice(None), *source)])


def test_crop_box_is_centred_on_the_brain(raw_001):
    slice_ = raw_001[..., 80]
    mask = slice_.any(axis=0)
    box = brain_crop_box(mask, 224)
    xs, ys = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    assert abs((box.x0 + 112) - (xs[0] + xs[-1] + 1) / 2) <= 0.5
    assert abs((box.y0 + 112) - (ys[0] + ys[-1] + 1) / 2) <= 0.5


def test_slice_without_brain_returns_none(raw_001):
    assert not raw_001[..., 0].any()
    assert preprocess_slice(raw_001[..., 0], CONFIG) is None
