"""Training samples per second of the KANU-Net variants, eager against torch.compile, on one GPU.

    python3 Training/scripts/compile_probe.py [--steps 30] [--batch 16]

Prints one row per (grids, grid range, eager|compiled) and, last, ``COMPILE=1`` when every
compiled variant ran and was at least 1.2x its eager rate (else ``COMPILE=0``): the device script
reads that line to set train.compile for the runs that follow.
"""

from __future__ import annotations

import argparse
import time

import torch

from KANTumorSegLib.unet import KANUNet2D, ModelConfig
from Training.config import DEFAULTS
from Training.train import targets
from Training.train_step import TrainStep

VARIANTS = ({"num_grids": 2, "grid_min": -1.0, "grid_max": 1.0}, {"num_grids": 4, "grid_min": -2.0, "grid_max": 2.0})


def rate(variant: dict, compiled: bool, batch: int, steps: int) -> float:
    """Samples per second of Training's own step (bf16 autocast, AdamW, BCE + Dice) after warm-up."""
    from monai.losses import DiceLoss

    torch.manual_seed(0)
    model = KANUNet2D(ModelConfig(head="regions", **variant)).cuda().train()
    net = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=DEFAULTS["train"]["weight_decay"])
    dice, bce = DiceLoss(sigmoid=True, batch=True), torch.nn.BCEWithLogitsLoss()
    step = TrainStep(net, optimizer, lambda logits, target: 0.2 * bce(logits, target) + dice(logits, target), torch.bfloat16)
    x = torch.rand(batch, 4, 224, 224, device="cuda") * 2 - 1
    y = targets(torch.randint(0, 3, (batch, 224, 224), device="cuda"), "regions")
    for _ in range(5):
        step(x, y)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    worth_it = True
    for variant in VARIANTS:
        eager = rate(variant, False, args.batch, args.steps)
        try:
            compiled = rate(variant, True, args.batch, args.steps)
        except Exception as error:  # noqa: BLE001 - any compiler failure means: train eagerly
            print(f"{variant}: compile failed: {type(error).__name__}: {str(error)[:200]}")
            compiled = 0.0
        print(f"{variant}: eager {eager:.0f} samples/s, compiled {compiled:.0f} samples/s ({compiled / eager:.2f}x)", flush=True)
        worth_it &= compiled >= 1.2 * eager
    print(f"COMPILE={int(worth_it)}")


if __name__ == "__main__":
    main()
