"""How far a lone slice's own intensity range is from its volume's, on the shared 3D cases.

    .venv/bin/python Training/scripts/scaling_agreement.py [-o OUT.json]

The HDF5 training slices can only be scaled by their own statistics; the 3D cases and every
volume the command reads are scaled by the whole volume's ("volume" intensity range). For each
3D case and modality, the ratio of a slice's range (high - low) to the volume's, over the slices
that hold expert tumour (what the HDF5 slices are) and over the brain slices without tumour
(where the study's min-max scaling stretches a little tissue over the whole range). A ratio of
1 means the slice is scaled as its volume is; the input of a voxel then moves by the factor.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from KANTumorSegLib.preprocessing import MODALITIES, PreprocessingConfig, brain_mask, intensity_ranges
from Training.data import CASE_FOLDERS, read_nifti_case


def ratios(volume: np.ndarray, seg: np.ndarray, config: PreprocessingConfig) -> dict[str, np.ndarray]:
    """(slices, 4) ratios of slice range to volume range, for tumour slices and tumour-free brain slices."""
    whole = intensity_ranges(volume, config)
    span = whole[:, 1] - whole[:, 0]
    out: dict[str, list] = {"tumour": [], "tumour_free": []}
    for z in range(volume.shape[-1]):
        if not brain_mask(volume[..., z]).any():
            continue
        own = intensity_ranges(volume[..., z], config)
        out["tumour" if seg[..., z].any() else "tumour_free"].append((own[:, 1] - own[:, 0]) / span)
    return {k: np.array(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("../shared/data/brats_samples"))
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args()
    result = {}
    for name in ("volume", "slice"):
        # "volume": a slice's own 99.5th percentile (what an HDF5 slice gets) against the volume's;
        # "slice": the study's slice maximum against the volume's maximum.
        config = PreprocessingConfig(intensity_range=name)
        pooled: dict[str, list] = {"tumour": [], "tumour_free": []}
        for case in CASE_FOLDERS:
            volume, seg = read_nifti_case(args.root / CASE_FOLDERS[case])
            for kind, values in ratios(volume, seg, config).items():
                if len(values):
                    pooled[kind].append(values)
        result[name] = {kind: {m: [round(float(q), 3) for q in np.percentile(np.concatenate(v)[:, c], [10, 50, 90])]
                               for c, m in enumerate(MODALITIES)} for kind, v in pooled.items()}
        for kind, per_modality in result[name].items():
            print(f"{name:6s} {kind:11s} " + "  ".join(f"{m} {q[1]:.2f} ({q[0]:.2f}-{q[2]:.2f})" for m, q in per_modality.items()))
    if args.output:
        args.output.write_text(json.dumps({"how": "slice range / volume range, 10th/50th/90th percentile over slices of the "
                                                  f"{len(CASE_FOLDERS)} shared 3D cases", **result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
