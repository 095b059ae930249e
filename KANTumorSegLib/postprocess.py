"""Post-processing of a whole labelmap, as BraTS-winning pipelines do after the network.

A 2D network decides slice by slice, so it leaves specks of "tumour" far from the tumour
(a bright vessel, the edge of a slice with little brain) and calls a few bright voxels of a
non-enhancing tumour "enhancing". Two rules, both with thresholds chosen on validation
patients and stored in the model card, undo that:

- whole-tumour parts smaller than ``min_component_ml`` are dropped (the largest part always
  stays, so a small tumour is never erased); parts are 26-connected, as the command's summary
  counts them;
- when the enhancing tumour totals less than ``et_min_ml``, it becomes necrotic/non-enhancing
  core (label 1): the core stays core, and a tumour without enhancement is not given any.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .measurements import whole_tumour_components


@dataclass(frozen=True)
class PostprocessConfig:
    """Thresholds of the two rules, in mL; 0 switches a rule off (the study had neither)."""

    min_component_ml: float = 0.0
    et_min_ml: float = 0.0

    def __post_init__(self) -> None:
        if self.min_component_ml < 0 or self.et_min_ml < 0:
            raise ValueError(f"post-processing thresholds must not be negative: {self}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> PostprocessConfig:
        data = data or {}
        unknown = set(data) - {"min_component_ml", "et_min_ml"}
        if unknown:
            raise ValueError(f"unknown post-processing keys: {', '.join(sorted(unknown))}")
        return cls(**{key: float(value) for key, value in data.items()})


def postprocess(labels: np.ndarray, voxel_ml: float, config: PostprocessConfig) -> np.ndarray:
    """A copy of a (X, Y, Z) labelmap in the 0/1/2/4 numbering with both rules applied."""
    out = np.array(labels, dtype=np.uint8, copy=True)
    if config.min_component_ml > 0 and out.any():
        index, counts = whole_tumour_components(out)
        small = np.nonzero(counts * voxel_ml < config.min_component_ml)[0]
        small = small[small > 1]  # 0 is the background, 1 the largest part
        out[np.isin(index, small)] = 0
    if config.et_min_ml > 0:
        enhancing = out == 4
        if 0 < enhancing.sum() * voxel_ml < config.et_min_ml:
            out[enhancing] = 1
    return out
