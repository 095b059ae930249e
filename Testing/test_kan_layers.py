"""The FastKAN convolution against its formula, written out independently here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from KANTumorSegLib.kan_layers import ChebyshevBasis, FastKANConv2d, GaussianRBF


def gaussian_expansion(x: torch.Tensor, centres: list[float], h: float) -> torch.Tensor:
    """exp(-((x - c_k) / h)^2) for each centre, channels grouped by centre (k-major)."""
    return torch.cat([torch.exp(-(((x - c) / h) ** 2)) for c in centres], dim=1)


@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("num_grids, grid_min, grid_max", [(4, -1.0, 1.0), (6, -2.0, 1.0)])
def test_fused_convolution_equals_two_branch_formula(num_grids, grid_min, grid_max, grad):
    """Both code paths of the layer: with gradients (training) and without (inference)."""
    torch.manual_seed(1)
    layer = FastKANConv2d(3, 5, kernel_size=3, padding=1, num_grids=num_grids, grid_min=grid_min, grid_max=grid_max).double()
    x = torch.empty(2, 3, 9, 7, dtype=torch.float64).uniform_(-1.5, 1.5)
    base, spline = layer.split_weights()
    assert base.shape == (5, 3, 3, 3) and spline.shape == (5, 3 * num_grids, 3, 3)

    h = (grid_max - grid_min) / (num_grids - 1)
    centres = [grid_min + k * h for k in range(num_grids)]
    expected = (F.conv2d(F.silu(x), base, layer.conv.bias, padding=1)
                + F.conv2d(gaussian_expansion(x, centres, h), spline, None, padding=1))
    with torch.set_grad_enabled(grad):
        actual = layer(x)
    # The layer keeps its centres in float32 (a buffer), hence 1e-6 rather than double precision.
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def test_gaussian_centres_are_evenly_spaced_and_width_is_their_spacing():
    rbf = GaussianRBF(num_grids=5, grid_min=-1.0, grid_max=1.0)
    np.testing.assert_allclose(rbf.centres.numpy(), [-1.0, -0.5, 0.0, 0.5, 1.0])
    assert rbf.inv_width == pytest.approx(1 / 0.5)
    # At a centre its own function is 1 and the neighbours' are exp(-1) (one spacing away).
    values = rbf(torch.zeros(1, 1, 1, 1)).flatten().numpy()
    np.testing.assert_allclose(values, np.exp(-np.array([4.0, 1.0, 0.0, 1.0, 4.0])), rtol=1e-6)


def test_study_defaults_are_four_grids_on_minus_one_one():
    layer = FastKANConv2d(2, 3)
    np.testing.assert_allclose(layer.basis.centres.numpy(), np.linspace(-1, 1, 4), rtol=1e-6)
    assert layer.conv.in_channels == 2 * (1 + 4)


def test_chebyshev_basis_matches_numpy_chebyshev_polynomials():
    basis = ChebyshevBasis(num_grids=5)
    x = torch.linspace(-3, 3, 41, dtype=torch.float64).view(1, 1, 41, 1)
    expanded = basis(x).squeeze(-1).squeeze(0).numpy()  # (5, 41): T_1..T_5 of tanh(x)
    t = np.tanh(np.linspace(-3, 3, 41))
    for k in range(1, 6):
        np.testing.assert_allclose(expanded[k - 1], np.polynomial.chebyshev.Chebyshev.basis(k)(t), atol=1e-12)


def test_too_few_grids_is_refused():
    with pytest.raises(ValueError):
        GaussianRBF(num_grids=1)


@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
def test_layernorm_before_the_basis_equals_its_formula(grad):
    """FastKAN's fix: the spline branch sees LayerNorm over the channels of each pixel; the
    SiLU base branch still sees the raw input."""
    torch.manual_seed(2)
    layer = FastKANConv2d(3, 4, num_grids=4, grid_min=-2.0, grid_max=2.0, basis_norm="layer").double()
    x = torch.relu(torch.empty(2, 3, 6, 5, dtype=torch.float64).normal_(0.5, 1.0))  # post-ReLU, as inside the net
    mean = x.mean(dim=1, keepdim=True)
    normed = (x - mean) / torch.sqrt(x.var(dim=1, unbiased=False, keepdim=True) + 1e-5)
    base, spline = layer.split_weights()
    h = 4.0 / 3
    expected = (F.conv2d(F.silu(x), base, layer.conv.bias, padding=1)
                + F.conv2d(gaussian_expansion(normed, [-2 + k * h for k in range(4)], h), spline, None, padding=1))
    with torch.set_grad_enabled(grad):
        actual = layer(x)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def test_post_relu_grid_puts_later_layers_on_the_range_they_receive():
    from KANTumorSegLib.unet import KANUNet2D, ModelConfig

    model = KANUNet2D(ModelConfig(num_grids=4, grid_placement="post_relu"))
    kan = [m for m in model.modules() if isinstance(m, FastKANConv2d)]
    first = model.inc[0]
    np.testing.assert_allclose(first.basis.centres.numpy(), [-1, -1 / 3, 1 / 3, 1], rtol=1e-6)  # sees the image
    for layer in kan:
        if layer is not first:
            np.testing.assert_allclose(layer.basis.centres.numpy(), [0, 1, 2, 3], rtol=1e-6)
    with pytest.raises(ValueError):
        ModelConfig(grid_placement="somewhere")
    with pytest.raises(ValueError):
        FastKANConv2d(2, 3, basis_norm="batch")
