"""Validation mean Dice of exported models with and without test-time flips and rotations.

The shipped model trained with 90-degree rotations and flips, so averaging its probabilities over
those transforms (test-time augmentation) might add accuracy at 4-8x the inference time. This
measures it on a run's own validation slices (its split.json), never on the test cases; a second
model adds the two-model ensemble.

    .venv/bin/python Training/scripts/tta_validation.py Training/experiments/h200_round4/ship4/ship4_w16_aug_g2_s0/split.json \
        Resources/Models/kanunet2d_brats.safetensors [other.safetensors]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from KANTumorSegLib.preprocessing import PreprocessingConfig
from KANTumorSegLib.unet import decode_logits
from KANTumorSegLib.weights import load_model
from Training.data import load_hdf5, select
from Training.metrics import mean_metrics

TRANSFORMS = {
    "none": [(0, False)],
    "4 flips": [(0, False), (0, True), (2, False), (2, True)],
    "8 dihedral": [(k, flip) for k in range(4) for flip in (False, True)],
}
"""(quarter turns, left-right flip) pairs whose predictions are averaged."""


def averaged_probabilities(model, x: torch.Tensor, transforms: list[tuple[int, bool]]) -> torch.Tensor:
    """Sigmoid outputs averaged over the transforms, each mapped back to the input's frame."""
    total = torch.zeros(())
    for turns, flip in transforms:
        t = torch.rot90(x, turns, (-2, -1))
        t = torch.flip(t, (-1,)) if flip else t
        with torch.inference_mode():
            p = torch.sigmoid(model(t).float())
        p = torch.flip(p, (-1,)) if flip else p
        total = total + torch.rot90(p, -turns, (-2, -1))
    return total / len(transforms)


def report(name: str, probabilities: torch.Tensor, truth: np.ndarray, head: str) -> None:
    labels = decode_logits(torch.logit(probabilities.clamp(1e-6, 1 - 1e-6)), head).numpy()
    r = mean_metrics(labels, truth)
    print(f"| {name} | {r['dice_mean']:.4f} | {r['dice_WT']:.3f} | {r['dice_TC']:.3f} | {r['dice_ET']:.3f} |")


def main(argv: list[str]) -> int:
    split_file, weights = Path(argv[0]), [Path(a) for a in argv[1:]]
    torch.set_num_threads(2)
    split = json.loads(split_file.read_text())
    hdf5 = load_hdf5(Path("../shared/data/brats_samples"), Path(".cache/slices"), PreprocessingConfig())
    val = select(split["val"], [hdf5])
    x = torch.from_numpy(val.inputs.astype(np.float32))
    print(f"# {len(val.labels)} validation slices of {split_file}")
    print("| model, transforms | val mean | WT | TC | ET |\n|---|---|---|---|---|")
    averaged = {}
    for path in weights:
        model, card, _ = load_model(path)
        head = card["model"]["head"]
        for name, transforms in TRANSFORMS.items():
            averaged[(path, name)] = averaged_probabilities(model.eval(), x, transforms)
            report(f"{path.stem}, {name}", averaged[(path, name)], val.labels, head)
    if len(weights) == 2:
        for name in ("none", "8 dihedral"):
            report(f"ensemble of both, {name}", (averaged[(weights[0], name)] + averaged[(weights[1], name)]) / 2,
                   val.labels, head)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
