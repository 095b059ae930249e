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


def test_a_budget_run_anneals_by_the_clock():
    """train.budget_s: one cosine cycle over the budget's seconds, whatever the epochs' speed."""
    from Training.train import budget_learning_rate

    cfg = {"lr": 1e-3, "eta_min": 1e-6, "budget_s": 300.0}
    rates = [budget_learning_rate(cfg, t) for t in (0.0, 75.0, 150.0, 225.0, 300.0, 400.0)]
    assert rates[0] == pytest.approx(1e-3) and rates[2] == pytest.approx((1e-3 + 1e-6) / 2)
    assert rates[4] == rates[5] == pytest.approx(1e-6)
    assert rates == sorted(rates, reverse=True)
