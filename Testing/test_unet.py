"""KANU-Net 2D: output shapes, parameter count from the architecture's formula, config round
trip through a weights file, and decoding of both output heads."""

from __future__ import annotations

import json

import pytest
import torch

from KANTumorSegLib.preprocessing import PreprocessingConfig
from KANTumorSegLib.unet import KANUNet2D, ModelConfig, decode_logits
from KANTumorSegLib.weights import load_model, save_model


def expected_parameters(width: int, grids: int, out_channels: int, conv: str) -> int:
    """Parameter count of the U-Net described in the issue, from its layer formulas.

    A KAN conv over i channels sees i * (1 + grids) expanded channels (SiLU + one per basis
    function); a plain conv sees i. BatchNorm has a weight and a bias per channel.
    """
    expansion = 1 + grids if conv == "kan" else 1

    def conv_params(i: int, o: int, k: int) -> int:
        return o * i * expansion * k * k + o

    def double(i: int, o: int, mid: int | None = None) -> int:
        mid = mid or o
        return conv_params(i, mid, 3) + 2 * mid + conv_params(mid, o, 3) + 2 * o

    w = width
    encoder = double(4, w) + double(w, 2 * w) + double(2 * w, 4 * w) + double(4 * w, 8 * w) + double(8 * w, 8 * w)
    # Bilinear up-sampling: the concatenated input is halved by the first conv of each block.
    decoder = double(16 * w, 4 * w, 8 * w) + double(8 * w, 2 * w, 4 * w) + double(4 * w, w, 2 * w) + double(2 * w, w, w)
    return encoder + decoder + conv_params(w, out_channels, 1)


@pytest.mark.parametrize("head, channels", [("classes", 4), ("regions", 3)])
def test_output_shape_follows_the_head(head, channels):
    model = KANUNet2D(ModelConfig(base_width=4, head=head)).eval()
    with torch.no_grad():
        # 40 x 56 is not a multiple of 16 in one axis' halvings: skips fix the up-sampled size.
        out = model(torch.randn(2, 4, 40, 56))
    assert out.shape == (2, channels, 40, 56)
    assert model.config.out_channels == channels


@pytest.mark.parametrize("conv, grids", [("kan", 4), ("kan", 6), ("plain", 4)])
@pytest.mark.parametrize("head, out_channels", [("classes", 4), ("regions", 3)])
def test_parameter_count_matches_formula(conv, grids, head, out_channels):
    model = KANUNet2D(ModelConfig(base_width=4, conv=conv, num_grids=grids, head=head))
    actual = sum(p.numel() for p in model.parameters())
    assert actual == expected_parameters(4, grids, out_channels, conv)


def test_config_round_trip_and_unknown_keys():
    config = ModelConfig(base_width=6, num_grids=5, grid_min=-2.0, grid_max=2.0, head="regions", basis="chebyshev")
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown model config keys: colour"):
        ModelConfig.from_dict({**config.to_dict(), "colour": "red"})
    with pytest.raises(ValueError):
        ModelConfig(base_width=5)


def test_weights_file_round_trip_rebuilds_the_same_network(tmp_path):
    torch.manual_seed(3)
    config = ModelConfig(base_width=4, head="regions", num_grids=3)
    model = KANUNet2D(config).eval()
    path = tmp_path / "m.safetensors"
    card = save_model(model, path, {"preprocessing": PreprocessingConfig().to_dict(), "name": "round-trip"})
    loaded, loaded_card, preprocessing = load_model(path)
    assert loaded.config == config and loaded_card == card and preprocessing == PreprocessingConfig()
    x = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_decode_classes_head_maps_argmax_to_brats_labels():
    logits = torch.zeros(1, 4, 1, 4)
    for position, channel in enumerate([0, 1, 2, 3]):
        logits[0, channel, 0, position] = 5.0
    assert decode_logits(logits, "classes").tolist() == [[[0, 1, 2, 4]]]


def test_decode_regions_head_is_nested():
    # Columns: (WT, TC, ET) signs -> expected label. ET outside TC, or TC outside WT, do not count.
    cases = [((-1, -1, -1), 0), ((1, -1, -1), 2), ((1, 1, -1), 1), ((1, 1, 1), 4),
             ((1, -1, 1), 2), ((-1, 1, 1), 0), ((-1, -1, 1), 0)]
    logits = torch.tensor([signs for signs, _ in cases], dtype=torch.float32).T.reshape(1, 3, 1, len(cases))
    assert decode_logits(logits, "regions")[0, 0].tolist() == [label for _, label in cases]


def test_decode_regions_on_random_logits_follows_thresholds():
    torch.manual_seed(4)
    logits = torch.randn(2, 3, 16, 16)
    labels = decode_logits(logits, "regions")
    wt, tc, et = (logits > 0).unbind(dim=1)
    assert torch.equal(labels > 0, wt)
    assert torch.equal((labels == 1) | (labels == 4), wt & tc)
    assert torch.equal(labels == 4, wt & tc & et)
