"""Kolmogorov-Arnold convolution: a learned function of every input value, then a convolution.

A FastKAN layer replaces the fixed activation of a convolution by a learned univariate
function per input channel, written as a weighted sum of basis functions. The weights of
that sum and the spatial kernel are learned together by one convolution over the
expanded channels.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn import functional as F

BASES = ("gaussian", "chebyshev")
BASIS_NORMS = ("none", "layer")
"""What the spline branch sees: the raw input (the study) or its LayerNorm over channels (FastKAN)."""


class GaussianRBF(nn.Module):
    """Gaussian radial basis exp(-((x - c_k) / h)^2), centres c_k evenly spaced on
    [grid_min, grid_max] and h their spacing (FastKAN; the study's basis)."""

    def __init__(self, num_grids: int = 4, grid_min: float = -1.0, grid_max: float = 1.0) -> None:
        super().__init__()
        if num_grids < 2:
            raise ValueError("num_grids must be at least 2")
        centres = torch.linspace(grid_min, grid_max, num_grids)
        self.register_buffer("centres", centres, persistent=False)
        self.inv_width = (num_grids - 1) / (grid_max - grid_min)
        self.num_functions = num_grids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C * num_grids, H, W), grouped by basis function."""
        centres = self.centres.to(x.dtype).view(1, -1, 1, 1, 1)
        z = (x.unsqueeze(1) - centres) * self.inv_width
        return torch.exp(-z * z).flatten(1, 2)


class ChebyshevBasis(nn.Module):
    """Chebyshev polynomials T_1..T_n of tanh(x): a global, non-local alternative basis
    (the study's stated limit was one basis function)."""

    def __init__(self, num_grids: int = 4, grid_min: float = -1.0, grid_max: float = 1.0) -> None:
        super().__init__()
        if num_grids < 1:
            raise ValueError("num_grids must be at least 1")
        self.num_functions = num_grids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C * num_grids, H, W): T_1(t), ..., T_n(t) with t = tanh(x)."""
        t = torch.tanh(x)
        terms = [t]
        previous = torch.ones_like(t)
        for _ in range(self.num_functions - 1):
            previous, current = terms[-1], 2 * t * terms[-1] - previous
            terms.append(current)
        return torch.cat(terms, dim=1)


def make_basis(name: str, num_grids: int, grid_min: float, grid_max: float) -> nn.Module:
    """The basis module called ``name`` (one of BASES)."""
    if name == "gaussian":
        return GaussianRBF(num_grids, grid_min, grid_max)
    if name == "chebyshev":
        return ChebyshevBasis(num_grids, grid_min, grid_max)
    raise ValueError(f"unknown basis {name!r}; choose one of {', '.join(BASES)}")


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of every pixel (FastKAN normalises its features before the
    basis). After BatchNorm and ReLU a layer's input is never negative and 40-50 % zeros, so
    centres on [-1, 1] half idle; normalised, the input is centred on the grid again."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FastKANConv2d(nn.Module):
    """FastKAN convolution: conv(basis(x)) + conv(SiLU(x)), run as one convolution.

    The base branch (SiLU) and the basis expansion are concatenated along channels so a
    single ``Conv2d`` computes both sums; its weight is the two branch kernels side by
    side (``split_weights`` returns them). Channels are ordered [SiLU(x), basis_1(x), ...].
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        padding: int = 1,
        num_grids: int = 4,
        grid_min: float = -1.0,
        grid_max: float = 1.0,
        basis: str = "gaussian",
        bias: bool = True,
        basis_norm: str = "none",
    ) -> None:
        super().__init__()
        if basis_norm not in BASIS_NORMS:
            raise ValueError(f"basis_norm must be one of {BASIS_NORMS}, not {basis_norm!r}")
        self.in_channels = in_channels
        self.norm = ChannelLayerNorm(in_channels) if basis_norm == "layer" else None
        self.basis = make_basis(basis, num_grids, grid_min, grid_max)
        expanded = in_channels * (1 + self.basis.num_functions)
        self.conv = nn.Conv2d(expanded, out_channels, kernel_size, padding=padding, bias=bias)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """The concatenated input of the fused convolution.

        With ``KANTUMORSEG_TRITON=1`` (read at every call, so a benchmark can time both paths in
        one process), Gaussian inference on CUDA runs one fused Triton kernel (``kan_triton``)
        where Triton is installed: 1.54x the model's rate on an H200. It is off by default
        because importing Triton and loading its kernels adds about 2 s to every fresh process
        (4.6 s on a first run that compiles them), while it saves 0.02 s per BraTS case: a
        single-case command is faster without it, and even Slicer's long-lived worker would
        gain only after about 100 cases (docs/PERFORMANCE.md, G7).
        """
        spline_input = x if self.norm is None else self.norm(x)
        if isinstance(self.basis, GaussianRBF) and not torch.is_grad_enabled():
            if x.is_cuda and self.norm is None and os.environ.get("KANTUMORSEG_TRITON") == "1":
                from . import kan_triton  # here, not at the top: CPU installs never import Triton

                if kan_triton.available():
                    scale = self.basis.inv_width
                    return kan_triton.expand_gaussian_channels_last(x, self.basis.centres * scale, scale)
            return self._expand_channels_last(x, spline_input)
        return torch.cat([F.silu(x), self.basis(spline_input)], dim=1)

    def _expand_channels_last(self, x: torch.Tensor, spline_input: torch.Tensor | None = None) -> torch.Tensor:
        """The same channels, written once into a channels-last buffer (inference only).

        Convolutions on the CPU (oneDNN) and on the GPU (cuDNN tensor cores) want
        channels last; building the expansion there skips the concatenation copy and the
        layout conversion, and needs three passes over the expanded tensor instead of six.
        The in-place ``out=`` writes are not differentiable, so training keeps ``torch.cat``.
        """
        batch, channels, height, width = x.shape
        grids = self.basis.num_functions
        pixels = x.permute(0, 2, 3, 1)
        out = torch.empty((batch, height, width, 1 + grids, channels), dtype=x.dtype, device=x.device)
        out[..., 0, :] = F.silu(pixels)
        spline = out[..., 1:, :]
        scale = self.basis.inv_width
        centres = (self.basis.centres.to(x.dtype) * scale).view(grids, 1)
        spline_pixels = pixels if spline_input is None else spline_input.permute(0, 2, 3, 1)
        torch.sub((spline_pixels * scale).unsqueeze(-2), centres, out=spline)
        # exp(-d * d): addcmul squares and negates in one pass.
        torch.addcmul(torch.zeros((), dtype=x.dtype, device=x.device), spline, spline, value=-1, out=spline)
        spline.exp_()
        return out.view(batch, height, width, (1 + grids) * channels).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.expand(x))

    def split_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(base kernel over SiLU(x), spline kernel over the basis channels)."""
        return self.conv.weight[:, : self.in_channels], self.conv.weight[:, self.in_channels :]
