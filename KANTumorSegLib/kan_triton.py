"""The FastKAN Gaussian expansion as one Triton kernel (CUDA inference only).

``FastKANConv2d._expand_channels_last`` builds [SiLU(x), exp(-(x*s - c_1*s)^2), ...] in several
eager passes (SiLU, subtract, square, exp), each reading and writing a tensor (1 + grids) times
the layer's input (about 19 x C values read or written per pixel for 2 grids). This kernel reads x once
and writes the expansion once (4 x C), straight into the channels-last buffer the convolution
wants; the step is memory-bound, so its time should fall with its bytes.

Triton is optional: this module imports without it (the CPU build of torch has none) and
``available()`` says whether the kernel runs here. It is opt-in: ``FastKANConv2d.expand`` imports
this module and calls it only for CUDA tensors in inference with ``KANTUMORSEG_TRITON=1`` set
(importing Triton costs a fresh process about 2 s, more than it saves on one case).
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs, CI
    triton = None

ELEMENTS_PER_PROGRAM = 2048
"""Pixels x channels one program handles: enough work per program to hide memory latency."""


@functools.cache
def available() -> bool:
    """Whether the kernel runs here: Triton importable, a CUDA device, and one tiny launch that
    works (Triton builds its launcher with the system's C compiler, which a machine may lack:
    then the layer keeps the eager expansion instead of failing)."""
    if not torch.cuda.is_available():
        return False
    if triton is None:
        # Only asked for on a CUDA run with KANTUMORSEG_TRITON=1: say why the setting does nothing.
        warnings.warn("KANTUMORSEG_TRITON=1, but Triton is not installed; using the eager expansion.", stacklevel=2)
        return False
    try:
        expand_gaussian_channels_last(torch.zeros(1, 1, 1, 1, device="cuda"), torch.zeros(1, device="cuda"), 1.0)
    except Exception as error:  # noqa: BLE001 - compiler, driver and Triton failures are many kinds
        warnings.warn(f"The fused Triton expansion does not run here ({type(error).__name__}: {str(error)[:80]}); "
                      "using the eager one.", stacklevel=2)
        return False
    return True


if triton is not None:

    @triton.jit
    def _gaussian_expansion_kernel(x_ptr, centres_ptr, out_ptr, scale, pixels, height, width,
                                   stride_b, stride_c, stride_h, stride_w,
                                   CHANNELS: tl.constexpr, GRIDS: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """One tile of BLOCK_P pixels x all channels: read x once (any strides), write the
        pixels' 1 + GRIDS rows of CHANNELS values into the (pixels, 1 + GRIDS, CHANNELS) buffer."""
        # int64 offsets: a large batch of wide layers passes 2^31 output elements.
        p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
        c = tl.arange(0, BLOCK_C)
        mask = (p < pixels)[:, None] & (c < CHANNELS)[None, :]
        if CHANNELS_LAST:  # the library's layout: pixel p's channels start at p * CHANNELS
            source = (p * CHANNELS)[:, None] + c[None, :]
        else:  # any other strides (NCHW): the slower integer divisions find b, h, w
            w = p % width
            h = (p // width) % height
            b = p // (width * height)
            source = (b * stride_b + h * stride_h + w * stride_w)[:, None] + (c * stride_c)[None, :]
        x = tl.load(x_ptr + source, mask=mask, other=0.0).to(tl.float32)
        target = out_ptr + (p * ((1 + GRIDS) * CHANNELS))[:, None] + c[None, :]
        tl.store(target, (x * tl.sigmoid(x)).to(out_ptr.dtype.element_ty), mask=mask)
        scaled = x * scale
        for g in tl.static_range(GRIDS):
            d = scaled - tl.load(centres_ptr + g)
            tl.store(target + (1 + g) * CHANNELS, tl.exp(-d * d).to(out_ptr.dtype.element_ty), mask=mask)


def expand_gaussian_channels_last(x: torch.Tensor, centres_scaled: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, C, H, W) x of any strides -> (B, (1 + G) * C, H, W) in x's dtype, channels last:
    [SiLU(x), exp(-(x * scale - centres_scaled[g])^2) for g in 0..G-1], computed in float32.

    The result is a view of a (B, H, W, 1 + G, C) buffer, as ``_expand_channels_last`` returns.
    """
    batch, channels, height, width = x.shape
    grids = centres_scaled.numel()
    out = torch.empty((batch, height, width, 1 + grids, channels), dtype=x.dtype, device=x.device)
    pixels = batch * height * width
    block_c = triton.next_power_of_2(channels)
    block_p = max(1, ELEMENTS_PER_PROGRAM // block_c)
    centres = centres_scaled.to(device=x.device, dtype=torch.float32).contiguous()
    # Triton launches on the current CUDA device: make it x's (CPU tensors: the interpreter).
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _gaussian_expansion_kernel[(triton.cdiv(pixels, block_p),)](
            x, centres, out, float(scale), pixels, height, width, *x.stride(),
            CHANNELS=channels, GRIDS=grids, CHANNELS_LAST=x.is_contiguous(memory_format=torch.channels_last),
            BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
    return out.view(batch, height, width, (1 + grids) * channels).permute(0, 3, 1, 2)
