"""``--confidence``: a per-voxel confidence map and a range around every tumour volume.

Estimator: test-time augmentation. Every slice runs through the model under the symmetries it
was trained with (90-degree rotations and left-right flips, ``Training/train.py``), each pass's
probabilities mapped back to the slice's frame. A voxel's confidence is the mean over the passes
of the probability each pass gives to the label written for it; for the nested region head that
probability is P(WT) P(TC) P(ET) along the label's path (ED: P(WT) (1 - P(TC)), background:
1 - P(WT)). So it falls both where one pass sits near its threshold and where the passes
disagree. A sigmoid trained with Dice loss is over-confident (near the tumour of
BraTS20_Training_001, voxels stated 99.7 % right were right 93 % of the time), so this raw
probability is recalibrated by Platt scaling, p = sigmoid(a logit(raw) + b), with (a, b) fitted
per model on shared cases outside its test set (``CALIBRATIONS``). The scaling is monotone, so it
changes no ranking, but it spreads the stated percentages over the range where they mean something
instead of piling them at 100, where the map's whole percents would tie them.
``Testing/benchmarks/confidence_eval.py`` fits (a, b) and measures the whole against one pass's own
sigmoid margin (docs/RESULTS.md, "Confidence").

Ensemble members (issue 19, ``ensemble.py``): a card may name other networks whose probability of
the written label is averaged with the passes' mean before the calibration; the card's
``confidence_passes`` may lower the passes where members carry the signal more cheaply.

Volume ranges: for a model whose card carries conformal bands (``conformal.py``, fitted on the
volume errors of patients it never trained on), those, which state their coverage. Otherwise the
region masks of the averaged probabilities thresholded at 0.5 + delta and 0.5 - delta,
intersected with (low end) or joined to (high end) the written labels, so that the range always
contains the volume written; NCR and ED, being differences of nested regions (NCR = TC - ET,
ED = WT - TC), take the low end of one and the high end of the other. These held the expert's
volume for only 11 of 35 (region, patient) test cases of the previous model.
"""

from __future__ import annotations

import numpy as np

from .errors import KANTumorSegError
from .inference import SlicePredictor
from .labels import ED, ET, NCR

PASSES: dict[int, tuple[tuple[int, bool], ...]] = {
    1: ((0, False),),
    2: ((0, False), (0, True)),
    4: ((0, False), (0, True), (2, False), (2, True)),
    8: tuple((turns, flip) for turns in range(4) for flip in (False, True)),
}
"""Test-time transforms by count: (quarter turns in the slice plane, left-right flip); 8 is
every symmetry of the square, the augmentations the model was trained with."""

DEFAULT_PASSES = 8
"""Passes of ``--confidence`` (docs/RESULTS.md, "Confidence": the measured choice)."""

LABELS_FROM_PASSES = False
"""Whether ``--confidence`` also takes the labels from the averaged passes (True) or keeps
the plain command's one-pass labels (False). False: averaged labels moved the mean 3D Dice of the
calibration cases by +0.0004 (WT +0.004, TC +0.006, ET -0.009), and one-pass labels keep the
volumes of a run the same with and without --confidence (docs/RESULTS.md, "Confidence")."""

RANGE_DELTA = 0.3
"""Half-width of the probability band whose region masks bound each volume range: [0.2, 0.8], the
narrowest band tried (0.1 to 0.49) under which the expert volume fell inside the range for most
(11 of 20) region-cases of the calibration cases (docs/RESULTS.md, "Confidence")."""

CALIBRATIONS: dict[str, tuple[float, float]] = {
    # vol_g2_s1 (shipped) with its card's post-processing, fitted on its 4 validation patients
    # BraTS2021_00005, 00024, 01477 and 01481 (docs/RESULTS.md, "Confidence").
    "c88479a58644e39203231a2cc40d2633c7bcbf086dd23f5aa394d558a179455b": (0.3597, -0.2184),
}
"""Platt scaling (a, b) by the sha256 of the model's weights, as fitted by
``Testing/benchmarks/confidence_eval.py --calibration`` (its JSON's ``calibration_fitted``). A
model without an entry here may carry ``"confidence_calibration": [a, b]`` in its card; else
(1, 0), the raw probability."""

RANGE_BITS = {"low": {"WT": 1, "TC": 2, "ET": 4}, "high": {"WT": 8, "TC": 16, "ET": 32}}
"""Bits of the range map: each voxel's membership of the low and high region masks."""


def transform(x, turns: int, flip: bool):
    """(..., H, W) tensor under one test-time transform: a left-right flip (the first image
    axis, patient left-right, as in training) after ``turns`` quarter turns."""
    import torch

    x = torch.rot90(x, turns, (-2, -1)) if turns else x
    return torch.flip(x, (-2,)) if flip else x


def untransform(x, turns: int, flip: bool):
    """The inverse of :func:`transform`: a prediction back in the input slice's frame."""
    import torch

    x = torch.flip(x, (-2,)) if flip else x
    return torch.rot90(x, -turns, (-2, -1)) if turns else x


def head_probabilities(logits, head: str):
    """(B, C, H, W) logits -> probabilities: sigmoid per region (``regions``: WT, TC, ET) or
    softmax over background, NCR, ED, ET (``classes``)."""
    import torch

    return torch.sigmoid(logits) if head == "regions" else torch.softmax(logits, dim=1)


def region_probabilities(probs, head: str):
    """(..., C, H, W) head probabilities -> (..., 3, H, W) P(WT), P(TC), P(ET)."""
    import torch

    if head == "regions":
        return probs
    return torch.stack([1 - probs[..., 0, :, :], probs[..., 1, :, :] + probs[..., 3, :, :], probs[..., 3, :, :]], dim=-3)


def decode(probs, head: str):
    """(B, C, H, W) probabilities -> (B, H, W) uint8 labels 0/1/2/4, as ``unet.decode_logits``
    decodes logits (nested thresholds at 0.5 for regions, arg-max for classes)."""
    from .unet import decode_logits

    return decode_logits(probs - 0.5 if head == "regions" else probs, head)


def label_probability(probs, labels, head: str):
    """(..., C, H, W) head probabilities, (..., H, W) labels -> the probability of each label.

    Classes head: that class's softmax output. Region head: the product of the nested
    decisions that lead to the label (background 1 - P(WT); ED P(WT)(1 - P(TC));
    NCR P(WT) P(TC) (1 - P(ET)); ET P(WT) P(TC) P(ET)).
    """
    import torch

    if head == "classes":
        index = torch.zeros_like(labels, dtype=torch.long)
        for channel, label in ((1, NCR), (2, ED), (3, ET)):
            index[labels == label] = channel
        return torch.gather(probs, -3, index.unsqueeze(-3)).squeeze(-3)
    wt, tc, et = probs.unbind(dim=-3)
    out = 1 - wt
    out = torch.where(labels == ED, wt * (1 - tc), out)
    out = torch.where(labels == NCR, wt * tc * (1 - et), out)
    return torch.where(labels == ET, wt * tc * et, out)


def calibration_for(card: dict) -> tuple[float, float]:
    """The Platt scaling (a, b) of a model: ``CALIBRATIONS``, then its card, else (1, 0)."""
    if card.get("sha256") in CALIBRATIONS:
        return CALIBRATIONS[card["sha256"]]
    a, b = card.get("confidence_calibration", (1.0, 0.0))
    return float(a), float(b)


def calibrate(raw, calibration: tuple[float, float]):
    """sigmoid(a logit(raw) + b): the raw label probability recalibrated (monotone for a > 0)."""
    import torch

    a, b = calibration
    if (a, b) == (1.0, 0.0):
        return raw
    return torch.sigmoid(a * torch.logit(raw.clamp(1e-6, 1 - 1e-6)) + b)


def doubt_percent(doubt: np.ndarray, calibration: tuple[float, float]) -> np.ndarray:
    """uint8 100 minus the calibrated confidence in percent, from a float map of 1 minus the raw
    (uncalibrated) label probability. Exact zeros, the fill outside every crop window (no brain,
    never predicted), stay 0: certain background, whatever the calibration."""
    import torch

    raw = torch.from_numpy(np.ascontiguousarray(doubt, dtype=np.float32))
    out = torch.round(100 * (1 - calibrate(1 - raw, calibration))).clamp(0, 100).to(torch.uint8)
    return torch.where(raw == 0, torch.zeros_like(out), out).numpy()


def passes_for(card: dict) -> int:
    """Test-time passes of the model's ``--confidence``: the card's ``confidence_passes``, else
    ``DEFAULT_PASSES``."""
    passes = card.get("confidence_passes", DEFAULT_PASSES)
    if passes not in PASSES:
        raise KANTumorSegError(f"The model card's confidence_passes must be one of {sorted(PASSES)}, not {passes!r}.")
    return int(passes)


def region_masks(regions, threshold: float):
    """(..., 3, H, W) region probabilities -> nested boolean WT, TC, ET masks at a threshold."""
    wt = regions[..., 0, :, :] >= threshold
    tc = wt & (regions[..., 1, :, :] >= threshold)
    return wt, tc, tc & (regions[..., 2, :, :] >= threshold)


def range_bits(regions, delta: float = RANGE_DELTA):
    """uint8 map of the nested WT, TC, ET masks at 0.5 + delta (bits 0-2, "surely") and at
    0.5 - delta (bits 3-5, "possibly") of (..., 3, H, W) region probabilities.

    Independent of the labels, so that :func:`volume_ranges` bounds the labels finally written
    (after any post-processing) and not those of the model alone.
    """
    import torch

    bits = torch.zeros(regions.shape[:-3] + regions.shape[-2:], dtype=torch.uint8, device=regions.device)
    for level, threshold in (("low", 0.5 + delta), ("high", 0.5 - delta)):
        for name, mask in zip(("WT", "TC", "ET"), region_masks(regions, threshold)):
            bits |= mask.to(torch.uint8) * RANGE_BITS[level][name]
    return bits


def volume_ranges(bits: np.ndarray, labels: np.ndarray, voxel_ml: float) -> dict[str, list[float]]:
    """[low, high] mL of NCR, ED, ET, WT and TC from a range map (:func:`range_bits`) and the
    written labels (same grid).

    Low end of a region: its written voxels that are "surely" in it; high end: its written voxels
    and those "possibly" in it; so the written volume always lies inside. NCR = TC - ET and
    ED = WT - TC: their low end takes the low TC (WT) and the high ET (TC), the high end the
    reverse, which again holds the written class.
    """
    written = {"WT": labels > 0, "TC": (labels == NCR) | (labels == ET), "ET": labels == ET}
    low = {r: written[r] & ((bits & b) > 0) for r, b in RANGE_BITS["low"].items()}
    high = {r: written[r] | ((bits & b) > 0) for r, b in RANGE_BITS["high"].items()}
    sets = {
        "NCR": (low["TC"] & ~high["ET"], high["TC"] & ~low["ET"]),
        "ED": (low["WT"] & ~high["TC"], high["WT"] & ~low["TC"]),
        "ET": (low["ET"], high["ET"]),
        "WT": (low["WT"], high["WT"]),
        "TC": (low["TC"], high["TC"]),
    }
    return {name: [round(int(lo.sum()) * voxel_ml, 4), round(int(hi.sum()) * voxel_ml, 4)] for name, (lo, hi) in sets.items()}


class ConfidencePredictor(SlicePredictor):
    """A :class:`SlicePredictor` that runs every slice under ``passes`` test-time transforms.

    ``predict`` returns labels as the plain predictor does (from the identity pass, or from
    the averaged passes with ``labels_from_passes``) and leaves, in ``maps``, the windows of the
    batch it last returned: ``doubt`` (float32, 1 minus the mean over the passes of the written
    label's probability, before calibration, so that the zero fill outside the crop window reads
    as certain background; :func:`doubt_percent` makes it the map's percent, after any ensemble
    members are averaged in, ``ensemble.py``) and ``range`` (range bits).
    ``inference.segment_volume(..., maps=...)`` pastes them as it pastes the labels.
    """

    MAP_DTYPES: dict[str, type] = {"doubt": np.float32, "range": np.uint8}
    MAP_NAMES: tuple[str, ...] = tuple(MAP_DTYPES)

    def __init__(self, model, device, batch_size: int = 16, precision: str = "float32", passes: int = DEFAULT_PASSES,
                 labels_from_passes: bool = LABELS_FROM_PASSES, delta: float = RANGE_DELTA) -> None:
        super().__init__(model, device, batch_size, precision)
        if passes not in PASSES:
            raise ValueError(f"passes must be one of {sorted(PASSES)}, not {passes}")
        self.transforms = PASSES[passes]
        self.passes = passes
        self.labels_from_passes = labels_from_passes
        self.delta = delta
        self.maps: dict[str, np.ndarray] = {}
        self._chunks: list[dict[str, np.ndarray]] = []

    def pass_probabilities(self, batch: np.ndarray):
        """(B, 4, H, W) inputs -> (T, B, C, H, W) float32 head probabilities, one per pass, on the device."""
        import torch

        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype,
                                                    enabled=self.dtype != torch.float32):
            x = torch.from_numpy(batch).to(self.device)
            out = []
            for turns, flip in self.transforms:
                t = transform(x, turns, flip).contiguous(memory_format=torch.channels_last)
                out.append(untransform(head_probabilities(self.model(t).float(), self.head), turns, flip))
            return torch.stack(out)

    def window_maps(self, passes, labels) -> dict[str, np.ndarray]:
        """The per-voxel maps of a batch from its passes' probabilities and its labels."""
        doubt = 1 - label_probability(passes, labels.unsqueeze(0), self.head).mean(dim=0)
        bits = range_bits(region_probabilities(passes.mean(dim=0), self.head), self.delta)
        return {"doubt": doubt.float().cpu().numpy(), "range": bits.cpu().numpy()}

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            passes = self.pass_probabilities(batch)
            labels = decode(passes.mean(dim=0) if self.labels_from_passes else passes[0], self.head)
            # Kept only once the whole batch succeeded: an out-of-memory retry re-runs it.
            self._chunks.append(self.window_maps(passes, labels))
            return labels.cpu().numpy()

    def predict(self, inputs: np.ndarray, progress=lambda done: None) -> np.ndarray:
        """(N, 4, H, W) inputs -> (N, H, W) labels; ``maps`` then holds these N slices' maps."""
        self._chunks = []
        labels = super().predict(inputs, progress)
        self.maps = {name: np.concatenate([chunk[name] for chunk in self._chunks]) for name in self._chunks[0]}
        self._chunks = []
        return labels
