"""The training step and the augmentation the training loop feeds it."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceLoss

from KANTumorSegLib.unet import KANUNet2D, ModelConfig
from Training.train_step import TrainStep


def test_step_lowers_the_loss_on_cpu():
    torch.manual_seed(0)
    model = KANUNet2D(ModelConfig(base_width=4, head="regions"))
    dice = DiceLoss(sigmoid=True, batch=True)
    step = TrainStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3),
                     lambda logits, target: 0.2 * torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
                     + dice(logits, target))
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 4, 64, 64, generator=generator) * 2 - 1
    target = (torch.rand(2, 3, 64, 64, generator=generator) > 0.8).float()
    losses = [float(step(x, target)) for _ in range(12)]
    assert losses[-1] < losses[0]


def test_flip_and_contrast_augmentation_keep_labels_aligned_and_background():
    from Training.augment import TensorAugmenter
    from Training.config import DEFAULTS

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


def test_rotation_and_shift_move_image_and_labels_together():
    """The study's augmentation (on in every recorded run): the image is built from its labels
    (-1 background, the label / 4 elsewhere), so after any rotation and shift it must still be."""
    from Training.augment import TensorAugmenter
    from Training.config import DEFAULTS

    cfg = {**DEFAULTS["train"], "rot90_prob": 1.0, "shift_prob": 1.0, "shift_pixels": 6}
    generator = torch.Generator().manual_seed(2)
    labels = torch.tensor([0, 1, 2, 4])[torch.randint(0, 4, (8, 24, 24), generator=generator)]
    images = torch.where(labels > 0, labels / 4.0, -1.0)[:, None].expand(8, 4, 24, 24).contiguous()
    out_x, out_y = TensorAugmenter(cfg, seed=0)(images, labels)
    assert torch.equal(out_x, torch.where(out_y > 0, out_y / 4.0, -1.0)[:, None].expand(8, 4, 24, 24))
    assert not torch.equal(out_y, labels)
    assert (out_y == 0).sum() > (labels == 0).sum()  # shifts bring in background


def test_affine_bias_and_noise_give_inputs_preprocessing_could_make():
    """The levers for other centres: after a small rotation/zoom, a bias field and noise, the
    background is still exactly -1, every channel of every slice still reaches 1 (inference
    min-max scales each slice), the labels keep their values and move with the image."""
    from Training.augment import TensorAugmenter
    from Training.config import DEFAULTS

    cfg = {**DEFAULTS["train"], "rot90_prob": 0.0, "shift_prob": 0.0, "affine_prob": 1.0, "bias_prob": 1.0,
           "noise_prob": 1.0}
    images = torch.full((4, 4, 48, 48), -1.0)
    images[:, :, 12:36, 12:36] = torch.rand(4, 4, 24, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1
    labels = torch.zeros(4, 48, 48, dtype=torch.long)
    labels[:, 18:30, 18:30] = 2
    labels[:, 22:26, 22:26] = 4
    out_x, out_y = TensorAugmenter(cfg, seed=0)(images, labels)
    assert set(out_y.unique().tolist()) <= {0, 2, 4} and (out_y == 4).any()
    assert torch.allclose(out_x.amax(dim=(-2, -1)), torch.ones(4, 4))
    assert out_x.min() >= -1.0
    background = (out_x == -1.0).all(dim=1)
    assert background[:, :4, :4].all() and not (out_y[background] > 0).any()  # no tumour in background
    assert not torch.equal(out_y, labels)  # the geometry did change


def test_the_epochs_are_fitted_to_the_budget_and_the_cosine_cycle_ends_there():
    """train.budget_s: after the second epoch the run plans what fits at that speed, and the one
    cosine cycle reaches eta_min on its last planned epoch instead of being cut at a high rate."""
    import time

    import torch

    from Training.train import fit_epochs_to_budget

    cfg = {"epochs": 400, "t0_epochs": 400, "budget_s": 100.0}
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=400, eta_min=1e-6)
    scheduler.step()
    scheduler.step()

    class Bar:
        total = 400

    # Two epochs took 19.5 s of the 100, the last 10 s: eight more fit, ten in all.
    fit_epochs_to_budget(cfg, scheduler, 1, 10.0, time.perf_counter() - 19.5, Bar)
    assert cfg["epochs"] == cfg["t0_epochs"] == Bar.total == 10
    rates = []
    for _ in range(8):
        rates.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    assert rates == sorted(rates, reverse=True) and rates[-1] < 1e-4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # epoch 10 would start a new cycle
    # Never more than configured, and a schedule of several cycles is left alone.
    cfg = {"epochs": 5, "t0_epochs": 5, "budget_s": 1000.0}
    fit_epochs_to_budget(cfg, scheduler, 1, 1.0, time.perf_counter(), Bar)
    assert cfg["epochs"] == 5
    cfg = {"epochs": 100, "t0_epochs": 10, "budget_s": 10.0}
    fit_epochs_to_budget(cfg, scheduler, 1, 5.0, time.perf_counter(), Bar)
    assert cfg["epochs"] == 100
