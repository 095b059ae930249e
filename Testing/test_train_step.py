"""The training step: eager on the CPU; captured as a CUDA graph on one GPU.

The graph test needs a CUDA GPU: CI has none, so it skips there; it runs in the H200 device
call (Training/scripts/h200_round3.sh runs this file first)."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceLoss

from KANTumorSegLib.unet import KANUNet2D, ModelConfig
from Training.train_step import CudaGraphTrainStep, TrainStep, make_optimizer


def _loss(logits, target):
    return 0.2 * torch.nn.functional.binary_cross_entropy_with_logits(logits, target) + \
        DiceLoss(sigmoid=True, batch=True)(logits, target)


def _batches(device, n: int = 8, size: int = 64):
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.rand(2, 4, size, size, generator=generator) * 2 - 1
        target = (torch.rand(2, 3, size, size, generator=generator) > 0.8).float()
        out.append((x.to(device), target.to(device)))
    return out


def _train(device, graphed: bool, batches, capturable: bool | None = None) -> tuple[list[float], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = KANUNet2D(ModelConfig(base_width=4, head="regions")).to(device)
    optimizer = make_optimizer(model.parameters(), 1e-3, 1e-6, device, graphed if capturable is None else capturable)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=3, eta_min=1e-6)
    step = (CudaGraphTrainStep if graphed else TrainStep)(model, optimizer, _loss)
    losses = []
    for x, target in batches:
        losses.append(float(step(x, target)))
        scheduler.step()  # once a step here, so that the replayed graph must read a changing rate
    return losses, [p.detach().clone() for p in model.parameters()]


def test_eager_step_lowers_the_loss_on_cpu():
    batches = _batches(torch.device("cpu"), n=1) * 12
    losses, _ = _train(torch.device("cpu"), False, batches)
    assert losses[-1] < losses[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs in the H200 device call, not in CI)")
def test_cuda_graph_step_trains_like_the_eager_step():
    device = torch.device("cuda")
    torch.backends.cudnn.deterministic = True
    batches = _batches(device)
    # The same capturable AdamW (tensor learning rate) on both sides: its arithmetic differs
    # from the float-rate AdamW by rounding (losses 1e-3 apart after 8 steps, seen on the H200).
    eager_losses, eager_params = _train(device, False, batches, capturable=True)
    graph_losses, graph_params = _train(device, True, batches)
    # 3 eager warm-up steps, then capture and 4 replays: each batch trained once, same rates.
    assert graph_losses == pytest.approx(eager_losses, rel=1e-4)
    for eager, graphed in zip(eager_params, graph_params):
        torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-5)
    float_rate_losses, _ = _train(device, False, batches)
    assert graph_losses == pytest.approx(float_rate_losses, rel=1e-2)


def test_flip_and_contrast_augmentation_keep_labels_aligned_and_background():
    from Training.config import DEFAULTS
    from Training.train import TensorAugmenter

    cfg = {**DEFAULTS["train"], "rot90_prob": 0.0, "shift_prob": 0.0, "flip_prob": 1.0, "gamma_prob": 1.0}
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 4, 32, 32, generator=generator) * 2 - 1
    images[:, :, :8] = -1.0  # background rows
    labels = torch.randint(0, 3, (2, 32, 32), generator=generator)
    out_x, out_y = TensorAugmenter(cfg, seed=0)(images, labels)
    assert torch.equal(out_y, torch.flip(labels, (-2,)))
    assert out_x.min() >= -1.0 and out_x.max() <= 1.0
    assert torch.equal(out_x[:, :, -8:], torch.full_like(out_x[:, :, -8:], -1.0))  # background stays background
    assert not torch.allclose(out_x, torch.flip(images, (-2,)))  # the contrast did change
