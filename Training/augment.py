"""Training-time augmentation: the study's random 90-degree rotations and shifts, and the
levers tried for patients from other centres (flip, contrast, small affine, bias field, noise)."""

from __future__ import annotations


class Augmenter:
    """The study's augmentation on the device: random 90-degree rotations and random
    shifts (MONAI RandRotate90d, RandAffined translation with nearest sampling, so a shift
    moves pixels without blurring them)."""

    def __init__(self, cfg: dict, seed: int) -> None:
        from monai.transforms import Compose, RandAffined, RandRotate90d

        extras = ("flip_prob", "gamma_prob", "affine_prob", "bias_prob", "noise_prob")
        if any(cfg[key] for key in extras):
            raise ValueError(f"train.{', train.'.join(extras)} need train.augment: tensor.")
        shift = cfg["shift_pixels"]
        self.transform = Compose([
            RandRotate90d(keys=("image", "label"), prob=cfg["rot90_prob"], max_k=3, spatial_axes=(0, 1)),
            RandAffined(keys=("image", "label"), prob=cfg["shift_prob"], translate_range=(shift, shift),
                        mode="nearest", padding_mode=("border", "zeros")),
        ])
        self.transform.set_random_state(seed)

    def __call__(self, images, labels):
        import torch

        out_x, out_y = [], []
        for image, label in zip(images, labels):
            sample = self.transform({"image": image, "label": label[None].float()})
            out_x.append(torch.as_tensor(sample["image"]))
            out_y.append(torch.as_tensor(sample["label"])[0])
        return torch.stack(out_x), torch.stack(out_y).round().long()


class TensorAugmenter:
    """The same two augmentations as plain tensor operations on the device: k x 90-degree
    rotation (k in 1..3) and an integer shift, each with its probability. MONAI's form builds
    and resamples an affine grid per slice, CPU work on every step of a launch-bound run; the
    experiment used this form (train.augment: tensor) to cut it (not timed separately);
    train.augment: monai keeps the MONAI transforms.

    Two more, off in the study's recipe (probability 0) and tried for the shipped model:
    a left-right flip (with the rotations, every symmetry of the square), and a random
    contrast change per channel, u -> u**g on the [0, 1] intensity u with g drawn from
    ``gamma_range``: a scanner or a BraTS release with another intensity profile changes
    the contrast that the per-slice min-max leaves.

    Three more for patients from other centres, also off unless configured: a small rotation
    and zoom, a bias field and noise (MONAI's RandAffine, RandBiasField and RandGaussianNoise,
    written here batched on the device). An intensity scale or shift is not among them: the
    per-slice min-max scaling of preprocessing removes both."""

    def __init__(self, cfg: dict, seed: int) -> None:
        import torch

        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(seed)

    def _draw(self, prob: float) -> bool:
        import torch

        return bool(torch.rand(1, generator=self.generator) < prob)

    def __call__(self, images, labels):
        import torch

        out_x, out_y = [], []
        shift = self.cfg["shift_pixels"]
        for image, label in zip(images, labels):
            if self._draw(self.cfg["rot90_prob"]):
                k = int(torch.randint(1, 4, (1,), generator=self.generator))
                image, label = torch.rot90(image, k, (-2, -1)), torch.rot90(label, k, (-2, -1))
            if self._draw(self.cfg["shift_prob"]):
                dx, dy = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=self.generator))
                image, label = shift_2d(image, dx, dy, -1.0), shift_2d(label, dx, dy, 0)
            if self._draw(self.cfg["flip_prob"]):
                image, label = torch.flip(image, (-2,)), torch.flip(label, (-2,))
            if self._draw(self.cfg["gamma_prob"]):
                low, high = self.cfg["gamma_range"]
                gamma = low + (high - low) * torch.rand(image.shape[0], 1, 1, generator=self.generator)
                image = 2.0 * ((image + 1.0) / 2.0).clamp(min=0.0).pow(gamma.to(image.device, image.dtype)) - 1.0
            out_x.append(image)
            out_y.append(label)
        images, labels = torch.stack(out_x), torch.stack(out_y)
        if self.cfg["affine_prob"]:
            images, labels = self._affine(images, labels)
        if self.cfg["bias_prob"] or self.cfg["noise_prob"]:
            images = self._intensity(images)
        return images, labels

    def _per_slice(self, prob: float, batch: int):
        """(batch,) float mask: 1 where a slice gets the augmentation."""
        import torch

        return (torch.rand(batch, generator=self.generator) < prob).float()

    def _affine(self, images, labels):
        """A small rotation (up to ``affine_degrees``) and zoom (up to ``affine_scale``) per
        slice: bilinear for the image (background stays -1), nearest for the labels."""
        import math

        import torch
        from torch.nn import functional as F

        batch = images.shape[0]
        on = self._per_slice(self.cfg["affine_prob"], batch)
        angle = (torch.rand(batch, generator=self.generator) * 2 - 1) * math.radians(self.cfg["affine_degrees"]) * on
        zoom = 1 + (torch.rand(batch, generator=self.generator) * 2 - 1) * self.cfg["affine_scale"] * on
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        zero = torch.zeros(batch)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
        images = F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
        labels = F.grid_sample(labels[:, None].to(images.dtype), grid, mode="nearest", padding_mode="zeros",
                               align_corners=False)[:, 0].round().to(labels.dtype)
        return images, labels

    def _intensity(self, images):
        """A smooth multiplicative bias field (exp of a random quadratic per channel, up to
        ``bias_strength``) and Gaussian noise (sd up to ``noise_std``) on the [0, 1] brain
        intensity, then each channel min-max scaled over its slice again, as inference
        scales every slice: the network never sees an input that preprocessing cannot make."""
        import torch

        batch, channels, height, width = images.shape
        device = images.device
        u = (images + 1) / 2
        brain = (u > 0).any(dim=1, keepdim=True)
        # Only the per-slice draws come from the CPU generator (they fix the run's randomness);
        # the full-size field and noise are made on the device, not copied there every step.
        if self.cfg["bias_prob"]:
            ys = torch.linspace(-1, 1, height, device=device).view(height, 1).expand(height, width)
            xs = torch.linspace(-1, 1, width, device=device).view(1, width).expand(height, width)
            basis = torch.stack([xs, ys, xs * ys, xs * xs, ys * ys])
            on = self._per_slice(self.cfg["bias_prob"], batch).view(batch, 1, 1)
            coeff = (torch.rand(batch, channels, 5, generator=self.generator) * 2 - 1) * self.cfg["bias_strength"] * on
            u = u * torch.exp(torch.einsum("bck,khw->bchw", coeff.to(device), basis)).to(u.dtype)
        if self.cfg["noise_prob"]:
            sigma = torch.rand(batch, 1, 1, 1, generator=self.generator) * self.cfg["noise_std"]
            sigma = sigma * self._per_slice(self.cfg["noise_prob"], batch).view(batch, 1, 1, 1)
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            noise = torch.randn(u.shape, generator=torch.Generator(device).manual_seed(seed), device=device, dtype=u.dtype)
            u = u + noise * sigma.to(device, u.dtype)
        u = torch.where(brain, u.clamp(min=0), torch.zeros_like(u))
        u = u / u.amax(dim=(-2, -1), keepdim=True).clamp(min=1e-6)
        return 2 * u - 1


def shift_2d(tensor, dx: int, dy: int, fill):
    """Move the last two axes by (dx, dy) pixels, filling what enters with ``fill``
    (-1 is the preprocessed background, 0 the background label)."""
    import torch

    out = torch.roll(tensor, (dx, dy), (-2, -1))
    if dx > 0:
        out[..., :dx, :] = fill
    elif dx < 0:
        out[..., dx:, :] = fill
    if dy > 0:
        out[..., :, :dy] = fill
    elif dy < 0:
        out[..., :, dy:] = fill
    return out
