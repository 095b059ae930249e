"""The fast inference paths compute what the plain formulas compute.

- FastKANConv2d's channels-last expansion (used under inference mode) against its own training
  path (test_kan_layers checks both paths against the two-branch formula).
- segment_volume (batched, channels last) against the study's per-slice 224 x 224 crops, on a real case.
- preprocess_slice (scales only the brain's box) and segment_volume (copies slices in blocks)
  against the plain per-slice formula written here, bit for bit, on real slices.
- SlicePredictor's out-of-memory halving, on a real CPU run under a real address-space cap
  (RLIMIT_AS in a subprocess): no mock. The GPU branch (batch from free memory, fallback to the
  CPU) needs a CUDA device; the benchmark exercises it on the H200 (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import processes
import pytest
import torch

from KANTumorSegLib.inference import SlicePredictor, segment_volume
from KANTumorSegLib.kan_layers import FastKANConv2d
from KANTumorSegLib.preprocessing import PreprocessingConfig, paste, preprocess_slice

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("in_ch", "out_ch", "kernel"), [(4, 8, 3), (16, 5, 3), (6, 3, 1)])
def test_inference_expansion_matches_the_training_path(in_ch: int, out_ch: int, kernel: int, channels_last: bool) -> None:
    """The channels-last expansion against the torch.cat one (test_kan_layers checks both
    against the two-branch formula, in float64)."""
    torch.manual_seed(in_ch * 10 + out_ch)
    layer = FastKANConv2d(in_ch, out_ch, kernel, kernel // 2).eval()
    x = torch.randn(3, in_ch, 17, 12) * 2  # values well outside the grid too
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        fast = layer(x)
        fast_expansion = layer.expand(x)
    # Grad enabled: the torch.cat path.
    training, training_expansion = layer(x).detach(), layer.expand(x).detach()
    assert fast.shape == (3, out_ch, 17, 12)
    assert fast_expansion.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast_expansion, training_expansion, rtol=0, atol=1e-6)
    torch.testing.assert_close(fast, training, rtol=1e-5, atol=1e-5)


def test_segment_volume_keeps_the_full_crop_labels(small_case: Path, mixed_model: Path) -> None:
    """Real case, random model: the command's path gives the labels of each slice's 224 crop
    run alone through the plain NCHW network."""
    from KANTumorSegLib.case_files import find_modalities
    from KANTumorSegLib.volumes import load_case
    from KANTumorSegLib.weights import load_model

    model, _, config = load_model(mixed_model)
    volume, _ = load_case(find_modalities(small_case, {}))
    default = segment_volume(volume, SlicePredictor(model, torch.device("cpu"), batch_size=4), config)

    full = np.zeros(volume.shape[1:], dtype=np.uint8)
    with torch.inference_mode():
        for z in range(volume.shape[3]):
            prepared = preprocess_slice(volume[..., z], config)
            if prepared is not None:
                logits = model(torch.from_numpy(prepared[0][None]))
                full[..., z] = paste(logits.argmax(dim=1)[0].numpy().astype(np.uint8), prepared[1], volume.shape[1:3])
    full = np.array([0, 1, 2, 4], dtype=np.uint8)[full]
    brain = (volume > volume.reshape(4, -1).min(axis=1)[:, None, None, None]).any(axis=0)
    assert len(np.unique(full[brain])) >= 2, "the random model should predict several classes"
    assert (default == full).mean() >= 0.9999, "the default path must give the full-crop labels"


def formula_input(slice_: np.ndarray, config: PreprocessingConfig) -> tuple[np.ndarray, int, int] | None:
    """The study's preprocessing as first written: scale the whole (4, X, Y) slice, then cut the
    window centred on the brain's bounding box (padding -1); None without brain."""
    brain = (slice_ > slice_.reshape(4, -1).min(axis=1)[:, None, None]).any(axis=0)
    if not brain.any():
        return None
    scaled = np.full(slice_.shape, -1.0, dtype=np.float32)
    for c, gamma in enumerate(config.gamma):
        channel = slice_[c].astype(np.float32)
        low, high = float(channel.min()), float(channel.max())
        if high > low:
            scaled[c] = 2.0 * ((channel - low) / (high - low)) ** gamma - 1.0
    xs, ys = np.nonzero(brain.any(axis=1))[0], np.nonzero(brain.any(axis=0))[0]
    size = config.crop_size
    x0, y0 = int(xs[0] + xs[-1] + 1) // 2 - size // 2, int(ys[0] + ys[-1] + 1) // 2 - size // 2
    padded = np.pad(scaled, ((0, 0), (size, size), (size, size)), constant_values=-1.0)
    return padded[:, x0 + size:x0 + 2 * size, y0 + size:y0 + 2 * size], x0, y0


@pytest.fixture(scope="module")
def volume_001(brats_case_001: Path) -> np.ndarray:
    """BraTS20_Training_001 on the model grid, (4, X, Y, Z) as segment_volume receives it."""
    from KANTumorSegLib.case_files import find_modalities
    from KANTumorSegLib.volumes import load_case

    return load_case(find_modalities(brats_case_001, {}))[0]


def test_load_case_keeps_axial_slices_contiguous(volume_001: np.ndarray, brats_case_001: Path) -> None:
    """load_case's (4, X, Y, Z) volume is a view of (4, Z, Y, X) memory (one copy of the files,
    each axial slice four contiguous planes: docs/PERFORMANCE.md), and holds each
    modality exactly as ITK reads it."""
    import SimpleITK as sitk

    assert volume_001.transpose(0, 3, 2, 1).flags.c_contiguous
    for channel, modality in enumerate(("t1", "t1ce", "t2", "flair")):
        image = sitk.ReadImage(str(brats_case_001 / f"BraTS20_Training_001_{modality}.nii.gz"), sitk.sitkFloat32)
        np.testing.assert_array_equal(volume_001[channel], sitk.GetArrayViewFromImage(image).transpose(2, 1, 0))


@pytest.mark.parametrize("crop_size", [224, 96])  # 96: a window smaller than the brain
def test_preprocess_slice_is_the_formula_bit_for_bit(volume_001: np.ndarray, crop_size: int) -> None:
    """Every axial slice of BraTS20_Training_001, strided as segment_volume's callers pass them."""
    config = PreprocessingConfig(crop_size=crop_size)
    skipped = 0
    for z in range(volume_001.shape[3]):
        expected, got = formula_input(volume_001[..., z], config), preprocess_slice(volume_001[..., z], config)
        if expected is None:
            assert got is None, f"slice {z}"
            skipped += 1
            continue
        assert (got[1].x0, got[1].y0, got[1].size) == (expected[1], expected[2], crop_size), f"slice {z}"
        assert got[0].dtype == np.float32 and got[0].tobytes() == expected[0].tobytes(), f"slice {z}"
    assert 0 < skipped < volume_001.shape[3], "the case has slices with and without brain"


def test_segment_volume_is_the_formula_bit_for_bit(volume_001: np.ndarray, mixed_model: Path) -> None:
    """8 real slices through the tumour, as load_case lays them out (a view of (4, Z, Y, X)
    memory), 96 x 96 windows to keep the model's work small: the per-slice formula's inputs,
    the same predictor batches, pasted by hand, give segment_volume's labelmap exactly."""
    from KANTumorSegLib.weights import load_model

    model, _, card_config = load_model(mixed_model)
    config = PreprocessingConfig(gamma=card_config.gamma, crop_size=96)
    volume = volume_001[..., 70:78]
    got = segment_volume(volume, SlicePredictor(model, torch.device("cpu"), batch_size=4), config)

    kept = [(z, prepared) for z in range(volume.shape[3]) if (prepared := formula_input(volume[..., z], config)) is not None]
    predicted = SlicePredictor(model, torch.device("cpu"), batch_size=4).predict(np.stack([p[0] for _, p in kept]))
    size, (nx, ny) = config.crop_size, volume.shape[1:3]
    expected = np.zeros(volume.shape[1:], dtype=np.uint8)
    for (z, (_, x0, y0)), labels in zip(kept, predicted):
        padded = np.zeros((nx + 2 * size, ny + 2 * size), dtype=np.uint8)
        padded[x0 + size:x0 + 2 * size, y0 + size:y0 + 2 * size] = labels
        expected[..., z] = padded[size:size + nx, size:size + ny]
    assert len(np.unique(expected)) >= 3, "the random model should predict several labels"
    assert got.dtype == np.uint8 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected)


OOM_SCRIPT = textwrap.dedent("""
    import resource, sys, warnings
    import numpy as np, torch
    from KANTumorSegLib.inference import SlicePredictor
    from KANTumorSegLib.unet import KANUNet2D, ModelConfig

    torch.manual_seed(0)
    model = KANUNet2D(ModelConfig(base_width=4)).eval()
    inputs = np.random.default_rng(0).uniform(-1, 1, (32, 4, 128, 128)).astype(np.float32)
    with torch.no_grad():  # a centred head labels pixels differently, so that a misplaced slice shows
        model.head.conv.bias -= model(torch.from_numpy(inputs[:4])).mean(dim=(0, 2, 3))
    expected = SlicePredictor(model, torch.device("cpu"), batch_size=2).predict(inputs)
    # Cap the address space at what the process uses now plus 100 MiB: 32 slices need more.
    size = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
    cap = size + 100 * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    predictor = SlicePredictor(model, torch.device("cpu"), batch_size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = predictor.predict(inputs)
    print(len(np.unique(expected)), predictor.batch_size, int(np.array_equal(got, expected)), len(caught))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status are Linux's")
def test_out_of_memory_halves_the_batch_on_a_real_cpu_run() -> None:
    result = processes.run([sys.executable, "-c", OOM_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    labels, batch, equal, warned = (int(v) for v in result.stdout.split()[-4:])
    assert labels >= 3, "the centred random model should predict several labels"
    assert 1 <= batch < 32, "the capped run should have lowered the batch"
    assert warned >= 1, "each halving warns"
    assert equal == 1, "the halved batches give the same labels as small batches without a cap"


def test_one_batch_equals_many() -> None:
    """Batch composition does not change a slice's labels (float32, CPU)."""
    from KANTumorSegLib.unet import KANUNet2D, ModelConfig

    torch.manual_seed(0)
    model = KANUNet2D(ModelConfig(base_width=4)).eval()
    inputs = np.random.default_rng(1).uniform(-1, 1, (6, 4, 48, 64)).astype(np.float32)
    # Centre the head's bias on these inputs (as conftest's mixed_model does on real slices):
    # a plain random network labels every pixel alike, and any batching would then agree.
    with torch.no_grad():
        model.head.conv.bias -= model(torch.from_numpy(inputs)).mean(dim=(0, 2, 3))
    together = SlicePredictor(model, torch.device("cpu"), batch_size=6).predict(inputs)
    apart = SlicePredictor(model, torch.device("cpu"), batch_size=1).predict(inputs)
    assert together.shape == (6, 48, 64)
    assert len(np.unique(together)) >= 3, "the centred random model should predict several labels"
    np.testing.assert_array_equal(together, apart)
