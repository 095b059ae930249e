"""The fast inference paths compute what the plain formulas compute.

- FastKANConv2d's channels-last expansion (used under inference mode) against the two-branch
  formula conv(SiLU(x), W_base) + conv(rbf(x), W_spline) and against its own training path.
- segment_volume (batched, channels last) against the study's per-slice 224 x 224 crops, on a real case.
- SlicePredictor's out-of-memory halving, on a real CPU run under a real address-space cap
  (RLIMIT_AS in a subprocess): no mock. The GPU branch (batch from free memory, fallback to the
  CPU) needs a CUDA device; the benchmark exercises it on the H200 (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from KANTumorSegLib.inference import SlicePredictor, segment_volume
from KANTumorSegLib.kan_layers import FastKANConv2d
from KANTumorSegLib.preprocessing import PreprocessingConfig, paste, preprocess_slice

REPO = Path(__file__).resolve().parent.parent


def two_branch_formula(layer: FastKANConv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(SiLU(x), W_base) + conv(exp(-((x - c_g) / h)^2) for each centre g, W_spline)."""
    base, spline = layer.split_weights()
    centres = torch.linspace(-1.0, 1.0, layer.basis.num_functions).tolist()
    spacing = centres[1] - centres[0]
    rbf = torch.cat([torch.exp(-(((x - c) / spacing) ** 2)) for c in centres], dim=1)
    padding = layer.conv.padding
    return F.conv2d(F.silu(x), base, layer.conv.bias, padding=padding) + F.conv2d(rbf, spline, None, padding=padding)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("in_ch", "out_ch", "kernel"), [(4, 8, 3), (16, 5, 3), (6, 3, 1)])
def test_inference_expansion_matches_the_formula(in_ch: int, out_ch: int, kernel: int, channels_last: bool) -> None:
    torch.manual_seed(in_ch * 10 + out_ch)
    layer = FastKANConv2d(in_ch, out_ch, kernel, kernel // 2).eval()
    x = torch.randn(3, in_ch, 17, 12) * 2  # values well outside the grid too
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = two_branch_formula(layer, x.contiguous())
    with torch.inference_mode():
        fast = layer(x)
        fast_expansion = layer.expand(x)
    training = layer(x)  # grad enabled: the torch.cat path
    assert fast.shape == expected.shape == (3, out_ch, 17, 12)
    assert fast_expansion.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_expansion, layer.expand(x).detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(training.detach(), expected, rtol=1e-5, atol=1e-5)


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


OOM_SCRIPT = textwrap.dedent("""
    import resource, sys, warnings
    import numpy as np, torch
    from KANTumorSegLib.inference import SlicePredictor
    from KANTumorSegLib.unet import KANUNet2D, ModelConfig

    torch.manual_seed(0)
    model = KANUNet2D(ModelConfig(base_width=4)).eval()
    inputs = np.random.default_rng(0).uniform(-1, 1, (32, 4, 128, 128)).astype(np.float32)
    expected = SlicePredictor(model, torch.device("cpu"), batch_size=2).predict(inputs)
    # Cap the address space at what the process uses now plus 100 MiB: 32 slices need more.
    size = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
    cap = size + 100 * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    predictor = SlicePredictor(model, torch.device("cpu"), batch_size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = predictor.predict(inputs)
    print(predictor.batch_size, int(np.array_equal(got, expected)), len(caught))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status are Linux's")
def test_out_of_memory_halves_the_batch_on_a_real_cpu_run() -> None:
    result = subprocess.run([sys.executable, "-c", OOM_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    batch, equal, warned = (int(v) for v in result.stdout.split()[-3:])
    assert 1 <= batch < 32, "the capped run should have lowered the batch"
    assert warned >= 1, "each halving warns"
    assert equal == 1, "the halved batches give the same labels as small batches without a cap"


def test_one_batch_equals_many(tiny_model: Path) -> None:
    """Batch composition does not change a slice's labels (float32, CPU)."""
    from KANTumorSegLib.weights import load_model

    model, _, _ = load_model(tiny_model)
    inputs = np.random.default_rng(1).uniform(-1, 1, (6, 4, 48, 64)).astype(np.float32)
    together = SlicePredictor(model, torch.device("cpu"), batch_size=6).predict(inputs)
    apart = SlicePredictor(model, torch.device("cpu"), batch_size=1).predict(inputs)
    assert together.shape == (6, 48, 64)
    np.testing.assert_array_equal(together, apart)
    assert PreprocessingConfig().crop_size % 16 == 0
