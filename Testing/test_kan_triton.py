"""The fused Triton Gaussian expansion against the layer's eager expansion, and the CPU fall back.

The kernel tests need Triton and either a CUDA GPU or Triton's CPU interpreter; without them
(CI, the CPU build of torch) they skip. To run them on a CPU:

    pip install --no-deps --target /tmp/tritonsite triton
    PYTHONPATH=/tmp/tritonsite TRITON_INTERPRET=1 pytest Testing/test_kan_triton.py
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from KANTumorSegLib.kan_layers import FastKANConv2d

# (rtol, atol) against the eager path: a few float32 units in the last place (on CUDA Triton's
# exp and sigmoid are the fast approximate ones), and in 16-bit formats a unit in the last place
# plus two near 1 (the eager path rounds each of its steps, the kernel only its result).
TOLERANCE = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (2**-7, 2**-6), torch.float16: (2**-10, 2**-9)}


def kernel_device() -> str:
    """Where the kernel can run here, or skip: CUDA, or the CPU under TRITON_INTERPRET=1."""
    pytest.importorskip("triton", reason="Triton is not installed (optional; the CUDA fast path only)")
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    pytest.skip("the Triton kernel needs a CUDA GPU or TRITON_INTERPRET=1 (Triton's CPU interpreter)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape, grids, layout", [
    ((3, 5, 7, 9), 2, "nchw"),             # C not a power of two, odd H and W
    ((3, 5, 7, 9), 2, "channels_last"),    # the same in the library's layout
    ((2, 16, 5, 3), 4, "channels_last"),   # the study's 4 grids
    ((1, 4, 6, 6), 3, "view"),             # neither layout: a channel slice of a channels-last tensor
    ((2, 6, 33, 40), 2, "channels_last"),  # 11 programs of 256 pixels, the last one partly masked
    ((2, 6, 33, 40), 2, "nchw"),           # the same through the general path's index arithmetic
    ((0, 5, 7, 9), 2, "channels_last"),    # an empty batch: no program, an empty expansion
])
def test_triton_expansion_equals_eager_expansion(shape, grids, layout, dtype):
    from KANTumorSegLib.kan_triton import expand_gaussian_channels_last

    device = kernel_device()
    torch.manual_seed(0)
    layer = FastKANConv2d(shape[1], 2, num_grids=grids).to(device)
    # Real inputs of a layer (normalised MRI, BatchNorm + ReLU outputs) lie in about [-1.5, 1.5];
    # a few large values check SiLU's tails and the Gaussians' underflow to 0.
    batch, channels, height, width = shape
    x = torch.empty(batch, channels + 1, height, width, device=device).uniform_(-1.5, 1.5)
    x[:1, 1:5, :1, :1] = torch.tensor([-30.0, -4.0, 4.0, 30.0]).view(1, 4, 1, 1)
    x = x.to(dtype)
    if layout == "view":
        x = x.contiguous(memory_format=torch.channels_last)[:, 1:]
    else:
        x = x[:, 1:].contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    scale = layer.basis.inv_width
    with torch.inference_mode():
        expected = layer._expand_channels_last(x)
        actual = expand_gaussian_channels_last(x, layer.basis.centres * scale, scale)
    assert actual.shape == expected.shape == (shape[0], (1 + grids) * shape[1], *shape[2:])
    assert actual.stride() == expected.stride() and actual.dtype == dtype
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def test_layer_falls_back_to_the_eager_expansion_on_the_cpu(monkeypatch):
    """On CPU tensors expand() never takes the Triton path, even with KANTUMORSEG_TRITON=1 and a
    kernel that says it runs. Stand-in: no CPU machine has a kernel that runs (available() needs
    CUDA), so kan_triton is told it is available and its kernel fails the test if called; without
    that, the eager result would come from available() saying no, not from the layer's CUDA check.
    Runs with or without Triton installed."""
    from KANTumorSegLib import kan_triton

    def kernel_must_not_run(*args: object) -> torch.Tensor:
        raise AssertionError("the Triton expansion ran on a CPU tensor")

    monkeypatch.setenv("KANTUMORSEG_TRITON", "1")
    monkeypatch.setattr(kan_triton, "available", lambda: True)
    monkeypatch.setattr(kan_triton, "expand_gaussian_channels_last", kernel_must_not_run)
    torch.manual_seed(0)
    layer = FastKANConv2d(5, 3, num_grids=2).eval()
    x = torch.empty(2, 5, 7, 9).uniform_(-1.5, 1.5).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expanded = layer.expand(x)
        eager = layer._expand_channels_last(x)
        silu = torch.nn.functional.silu(x)
    torch.testing.assert_close(expanded, eager, rtol=0, atol=0)
    torch.testing.assert_close(expanded[:, :5], silu, rtol=0, atol=0)  # SiLU channels first


def test_kernel_is_unavailable_without_triton_or_cuda():
    """The module imports on CPU-only installs (no Triton) and says the kernel cannot run."""
    from KANTumorSegLib import kan_triton

    if importlib.util.find_spec("triton") is not None and torch.cuda.is_available():
        pytest.skip("Triton and CUDA are both here; the kernel tests above cover this machine")
    assert not kan_triton.available()


def test_kernel_that_cannot_launch_is_reported_unavailable(monkeypatch):
    """Where Triton imports but its probe launch fails (on a GPU machine: a missing C compiler),
    available() warns and says no, so the layer keeps the eager expansion. Stand-in: a CPU build
    of torch told that CUDA is there, so the probe fails earlier, making its CUDA input; the
    except branch and the warning are the same."""
    pytest.importorskip("triton", reason="Triton is not installed (optional; the CUDA fast path only)")
    if torch.cuda.is_available():
        pytest.skip("a real CUDA device is here; the launch would work")
    from KANTumorSegLib import kan_triton

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    kan_triton.available.cache_clear()
    try:
        with pytest.warns(UserWarning, match="does not run here"):
            assert not kan_triton.available()
    finally:
        kan_triton.available.cache_clear()
