"""Preprocessing invariants on real BraTS slices and volumes."""

from __future__ import annotations

import numpy as np
import pytest

from KANTumorSegLib.preprocessing import (
    MODALITIES,
    CropBox,
    PreprocessingConfig,
    brain_crop_box,
    brain_mask,
    crop,
    intensity_ranges,
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


VOLUME = PreprocessingConfig(intensity_range="volume")


def test_volume_ranges_are_the_minimum_and_the_percentile_of_the_brain_voxels(raw_001):
    ranges = intensity_ranges(raw_001, VOLUME)
    brain = (raw_001 > raw_001.reshape(4, -1).min(axis=1).reshape(4, 1, 1, 1)).any(axis=0)
    for c in range(4):
        assert ranges[c, 0] == raw_001[c].min()
        assert ranges[c, 1] == pytest.approx(np.percentile(raw_001[c][brain], 99.5), rel=1e-6)
    np.testing.assert_array_equal(intensity_ranges(raw_001[..., 80], CONFIG)[:, 1], raw_001[..., 80].reshape(4, -1).max(axis=1))


def test_volume_scaling_gives_a_voxel_the_same_input_whatever_its_slice_holds(raw_001):
    """The study's slice scaling stretches a slice with little brain over the whole range (the
    false tumour over the cerebellum); with the volume's ranges a voxel's input is the formula of
    its value alone, clipped at the percentile, on every slice."""
    ranges = intensity_ranges(raw_001, VOLUME)
    areas = [brain_mask(raw_001[..., z]).sum() for z in range(raw_001.shape[-1])]
    small = next(z for z in range(raw_001.shape[-1]) if 0 < areas[z] < 0.3 * max(areas))
    for z in (small, 80):
        model_input, box = preprocess_slice(raw_001[..., z], VOLUME, ranges)
        expected = crop(scale_intensities(raw_001[..., z], VOLUME, ranges), box, fill=-1.0)
        np.testing.assert_array_equal(model_input, expected)
        for c, gamma in enumerate(VOLUME.gamma):
            u = np.clip((raw_001[c, ..., z] - ranges[c, 0]) / (ranges[c, 1] - ranges[c, 0]), 0, 1)
            np.testing.assert_allclose(scale_intensities(raw_001[..., z], VOLUME, ranges)[c], 2 * u**gamma - 1, atol=1e-5)
    # The small slice under its own min-max reaches 1 in every modality; under the volume's
    # ranges it stays darker in T1ce and FLAIR than the tumour slices do.
    own = preprocess_slice(raw_001[..., small], CONFIG)[0]
    shared = preprocess_slice(raw_001[..., small], VOLUME, ranges)[0]
    assert own.max(axis=(1, 2)).min() == pytest.approx(1.0)
    assert shared[1].mean() < own[1].mean() and shared[3].mean() < own[3].mean()


def test_volume_scaling_ignores_positive_affine_intensity_change(raw_001):
    scale = np.array([0.01, 3.0, 250.0, 0.5], dtype=np.float64).reshape(4, 1, 1, 1)
    changed = (raw_001.astype(np.float64) * scale + 5.0).astype(np.float32)
    for z in (30, 80):
        original = preprocess_slice(raw_001[..., z], VOLUME, intensity_ranges(raw_001, VOLUME))[0]
        moved = preprocess_slice(changed[..., z], VOLUME, intensity_ranges(changed, VOLUME))[0]
        np.testing.assert_allclose(moved, original, atol=3e-5)


def test_cards_without_the_scaling_keys_read_as_the_study_and_bad_values_are_refused():
    old_card = {"gamma": [1.0, 1.5, 1.5, 1.2], "crop_size": 224, "channels": list(MODALITIES)}
    assert PreprocessingConfig.from_dict(old_card) == PreprocessingConfig()
    assert PreprocessingConfig.from_dict(VOLUME.to_dict()) == VOLUME
    with pytest.raises(ValueError, match="intensity_range 'global'"):
        PreprocessingConfig.from_dict({**old_card, "intensity_range": "global"})
    with pytest.raises(ValueError, match="upper_percentile 30"):
        PreprocessingConfig.from_dict({**old_card, "intensity_range": "volume", "upper_percentile": 30})


def test_segment_volume_scales_every_slice_by_the_volume_ranges_when_the_card_says_so(raw_001, tiny_model):
    """The library's inference with a "volume" card: the labels are those of the network on
    slices scaled by the whole volume's ranges, not by their own."""
    import torch

    from KANTumorSegLib.inference import SlicePredictor, segment_volume
    from KANTumorSegLib.weights import load_model

    model, _, _ = load_model(tiny_model)
    volume = np.ascontiguousarray(raw_001[..., 60:68])
    predictor = SlicePredictor(model, torch.device("cpu"), 8, "float32")
    labels = segment_volume(volume, predictor, VOLUME)
    ranges = intensity_ranges(volume, VOLUME)
    prepared = [preprocess_slice(volume[..., z], VOLUME, ranges) for z in range(volume.shape[-1])]
    expected = predictor.predict(np.stack([p[0] for p in prepared]))
    for z, (_, box) in enumerate(prepared):
        np.testing.assert_array_equal(labels[..., z], paste(expected[z], box, volume.shape[1:3]))
    own = np.stack([preprocess_slice(volume[..., z], CONFIG)[0] for z in range(volume.shape[-1])])
    assert np.abs(own - np.stack([p[0] for p in prepared])).max() > 0.1, "the two scalings gave the same input"
