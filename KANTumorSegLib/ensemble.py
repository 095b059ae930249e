"""Ensemble members of ``--confidence``: independently trained networks whose disagreement with
the written labels lowers the confidence.

Why: on patients from other centres the model's errors are systematic (a whole structure
mislabelled) and its own test-time passes agree on them; a second network trained from another
seed or on other data makes other mistakes, so where the two disagree the label is more often
wrong (deep ensembles, Lakshminarayanan et al. 2017). Members never change the labels or the
volumes: they come from the main model alone, as without ``--confidence``.

The card names them: ``"confidence_members": ["kanunet2d_brats_member1.safetensors"]``, files
beside the main weights, each with its own card (checked like the main one) and therefore its own
architecture and preprocessing; ``"confidence_member_passes"`` (default 1) sets their test-time
passes. A member may be stored in float16 (``weights.save_model(half=True)``), which
``weights.load_model`` casts to the float32 network, so that main model and members stay under the
20 MB the extension ships.

A member runs over the whole volume through ``inference.segment_volume`` with its own
preprocessing, keeping its region probabilities P(WT), P(TC), P(ET) (zero, certain background,
outside its crop windows). Its probability of each written label follows the nested decisions
(``confidence.label_probability`` of the region head, also for a member with the classes head);
the voxel's raw confidence is the mean over main model and members of their label probabilities,
each model counting once whatever its passes, and is then calibrated as the main model's alone is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .confidence import ConfidencePredictor, label_probability, region_probabilities
from .errors import KANTumorSegError
from .progress import no_progress

CARD_KEY = "confidence_members"
PASSES_KEY = "confidence_member_passes"
REGION_MAPS = ("p_WT", "p_TC", "p_ET")


def member_paths(model_path: Path, card: dict) -> list[Path]:
    """The member weights files a card names, beside the main weights; an error naming the card
    when one is missing (a member is part of the model, not an option)."""
    names = card.get(CARD_KEY) or []
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise KANTumorSegError(f"The model card of {model_path} has an invalid {CARD_KEY} (a list of file names is needed).")
    paths = [model_path.parent / name for name in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise KANTumorSegError(f"Ensemble member {missing[0]} named by the card of {model_path} is missing; "
                               "every member file (and its .json card) travels with the model.")
    return paths


class RegionProbabilityPredictor(ConfidencePredictor):
    """Keeps, as maps, the region probabilities averaged over its passes (float16: three maps of a
    BraTS volume take 54 MB)."""

    MAP_DTYPES: dict[str, type] = dict.fromkeys(REGION_MAPS, np.float16)
    MAP_NAMES: tuple[str, ...] = REGION_MAPS

    def window_maps(self, passes, labels) -> dict[str, np.ndarray]:
        regions = region_probabilities(passes.mean(dim=0), self.head).half().cpu().numpy()
        return {name: regions[:, r] for r, name in enumerate(REGION_MAPS)}


def member_doubt(path: Path, volume: np.ndarray, labels: np.ndarray, device, batch_size: int, precision: str,
                 passes: int = 1, progress: Callable[[str, int, int], None] = no_progress) -> np.ndarray:
    """(X, Y, Z) float32 1 minus a member's probability of ``labels`` (the main model's, on the
    model grid) for a (4, X, Y, Z) model-grid volume, the member run with its own card's
    preprocessing."""
    import torch

    from .inference import choose_precision, segment_volume
    from .weights import load_model

    model, card, preprocessing = load_model(path)
    predictor = RegionProbabilityPredictor(model, device, batch_size, choose_precision(precision, device, card), passes=passes)
    maps = {name: np.zeros(volume.shape[1:], dtype=np.float16) for name in REGION_MAPS}
    segment_volume(volume, predictor, preprocessing, progress, maps=maps)
    # (3, 1, N) probabilities and (1, N) labels: the (..., C, H, W) layout label_probability takes.
    regions = torch.from_numpy(np.stack([maps.pop(name).reshape(1, -1) for name in REGION_MAPS])).float()
    probability = label_probability(regions, torch.from_numpy(labels.reshape(1, -1)), "regions")
    return (1 - probability).reshape(labels.shape).numpy()


def ensemble_doubt(main_doubt: np.ndarray, model_path: Path, card: dict, volume: np.ndarray, labels: np.ndarray,
                   device, batch_size: int, precision: str,
                   progress: Callable[[str, int, int], None] = no_progress) -> np.ndarray:
    """The main model's raw doubt (``ConfidencePredictor``'s ``doubt`` map) averaged with that of
    every member the card names; the main doubt itself when it names none."""
    paths = member_paths(model_path, card)
    if not paths:
        return main_doubt
    passes = int(card.get(PASSES_KEY, 1))
    total = main_doubt.astype(np.float32, copy=True)
    for i, path in enumerate(paths):
        def report(stage: str, done: int, total_: int, i: int = i) -> None:
            if stage == "segment":
                progress(f"member {i + 1}", done, total_)
        total += member_doubt(path, volume, labels, device, batch_size, precision, passes, report)
    total /= 1 + len(paths)
    return total
