"""KANU-Net 2D: a U-Net whose every convolution is a FastKAN convolution.

Topology follows the U-Net of the study (and milesial's Pytorch-UNet it builds on):
four max-pooling levels, bilinear up-sampling with skip concatenation, DoubleConv blocks.
``conv="plain"`` builds the same network with ordinary Conv2d, the control the study lacked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn
from torch.nn import functional as F

from .kan_layers import BASES, BASIS_NORMS, FastKANConv2d

HEAD_CHANNELS = {"classes": 4, "regions": 3}
"""Output channels of each head. ``classes``: background, NCR/NET, ED, ET (the study).
``regions``: WT, TC, ET (nested)."""
HEADS = tuple(HEAD_CHANNELS)
GRID_PLACEMENTS = ("uniform", "post_relu")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a network; stored in every model card."""

    in_channels: int = 4
    base_width: int = 16
    conv: str = "kan"
    basis: str = "gaussian"
    num_grids: int = 4
    grid_min: float = -1.0
    grid_max: float = 1.0
    head: str = "classes"
    # Where the basis of the convolutions after the first sits. "uniform": every KAN conv on
    # [grid_min, grid_max] (the study). "post_relu": the first on [grid_min, grid_max] (it sees
    # the image, in [-1, 1]); every later one on [0, relu_grid_max], the range its BatchNorm-
    # then-ReLU input actually takes (never negative, 99th percentile 2.3-3.7).
    grid_placement: str = "uniform"
    relu_grid_max: float = 3.0
    basis_norm: str = "none"

    def __post_init__(self) -> None:
        if self.conv not in ("kan", "plain"):
            raise ValueError(f"conv must be 'kan' or 'plain', not {self.conv!r}")
        if self.basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, not {self.basis!r}")
        if self.grid_placement not in GRID_PLACEMENTS:
            raise ValueError(f"grid_placement must be one of {GRID_PLACEMENTS}, not {self.grid_placement!r}")
        if self.basis_norm not in BASIS_NORMS:
            raise ValueError(f"basis_norm must be one of {BASIS_NORMS}, not {self.basis_norm!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, not {self.head!r}")
        if self.base_width < 2 or self.base_width % 2:
            raise ValueError("base_width must be an even number of at least 2")

    @property
    def out_channels(self) -> int:
        return HEAD_CHANNELS[self.head]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        return cls(**data)


def make_conv(config: ModelConfig, in_ch: int, out_ch: int, kernel_size: int = 3, first: bool = False) -> nn.Module:
    """The convolution of the configured kind (FastKAN or plain); ``first`` marks the one that
    sees the image rather than a BatchNorm-then-ReLU output."""
    padding = kernel_size // 2
    if config.conv == "plain":
        return nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding)
    low, high = config.grid_min, config.grid_max
    if config.grid_placement == "post_relu" and not first:
        low, high = 0.0, config.relu_grid_max
    return FastKANConv2d(in_ch, out_ch, kernel_size, padding, config.num_grids, low, high, config.basis,
                         basis_norm=config.basis_norm)


class DoubleConv(nn.Sequential):
    """(conv, BatchNorm, ReLU) twice: the study's building block."""

    def __init__(self, config: ModelConfig, in_ch: int, out_ch: int, mid_ch: int | None = None,
                 first: bool = False) -> None:
        mid_ch = mid_ch or out_ch
        super().__init__(
            make_conv(config, in_ch, mid_ch, first=first), nn.BatchNorm2d(mid_ch), nn.ReLU(inplace=True),
            make_conv(config, mid_ch, out_ch), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 max-pooling, then a DoubleConv: one encoder level."""

    def __init__(self, config: ModelConfig, in_ch: int, out_ch: int) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(config, in_ch, out_ch))


class Up(nn.Module):
    """Bilinear 2x up-sampling, concatenation with the skip, then a DoubleConv."""

    def __init__(self, config: ModelConfig, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = DoubleConv(config, in_ch, out_ch, in_ch // 2)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self.conv(torch.cat([skip, x], dim=1))


class KANUNet2D(nn.Module):
    """KANU-Net 2D: 4 input channels (T1, T1ce, T2, FLAIR) to per-pixel logits.

    Widths are base_width x (1, 2, 4, 8, 8) down the encoder (the bottleneck is halved as
    in a bilinear U-Net); the output head is a 1x1 convolution of the same kind.
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        c, w = self.config, self.config.base_width
        self.inc = DoubleConv(c, c.in_channels, w, first=True)
        self.down1 = Down(c, w, 2 * w)
        self.down2 = Down(c, 2 * w, 4 * w)
        self.down3 = Down(c, 4 * w, 8 * w)
        self.down4 = Down(c, 8 * w, 8 * w)
        self.up1 = Up(c, 16 * w, 4 * w)
        self.up2 = Up(c, 8 * w, 2 * w)
        self.up3 = Up(c, 4 * w, w)
        self.up4 = Up(c, 2 * w, w)
        self.head = make_conv(c, w, c.out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x = self.down4(x4)
        x = self.up1(x, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        return self.head(x)


def decode_logits(logits: torch.Tensor, head: str) -> torch.Tensor:
    """(B, C, H, W) logits -> (B, H, W) uint8 labels in the internal 0/1/2/4 numbering.

    ``classes``: arg-max over background, NCR, ED, ET. ``regions``: nested thresholds,
    ET inside TC inside WT, as in region-based BraTS training.
    """
    if head == "classes":
        lut = torch.tensor([0, 1, 2, 4], dtype=torch.uint8, device=logits.device)
        return lut[logits.argmax(dim=1)]
    wt, tc, et = (logits > 0).unbind(dim=1)
    tc = tc & wt
    et = et & tc
    labels = torch.zeros_like(wt, dtype=torch.uint8)
    labels[wt] = 2
    labels[tc] = 1
    labels[et] = 4
    return labels
