"""The networks the experiment compares: KANU-Net 2D (FastKAN or plain convolutions, from
the library) and MONAI's BasicUNet 2D, the third, independent control."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from KANTumorSegLib.unet import HEAD_CHANNELS, KANUNet2D, ModelConfig

ARCHS = ("kanunet", "basicunet")


@dataclass(frozen=True)
class ControlConfig:
    """The little a control network shares with ModelConfig: its output head (what the
    library's SlicePredictor reads to decode logits)."""

    head: str = "classes"

    @property
    def out_channels(self) -> int:
        return HEAD_CHANNELS[self.head]


class BasicUNetControl(nn.Module):
    """MONAI BasicUNet 2D with a ``config`` attribute, so library inference can run it."""

    def __init__(self, head: str) -> None:
        super().__init__()
        from monai.networks.nets import BasicUNet

        self.config = ControlConfig(head)
        self.net = BasicUNet(spatial_dims=2, in_channels=4, out_channels=self.config.out_channels)

    def forward(self, x):
        return self.net(x)


def build_model(model_cfg: dict) -> nn.Module:
    """The network a run's ``model`` section describes."""
    cfg = dict(model_cfg)
    arch = cfg.pop("arch", "kanunet")
    if arch == "basicunet":
        return BasicUNetControl(cfg.get("head", "classes"))
    if arch != "kanunet":
        raise ValueError(f"model.arch must be one of {ARCHS}, not {arch!r}")
    return KANUNet2D(ModelConfig.from_dict(cfg))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
