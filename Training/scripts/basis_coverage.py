"""How well each KAN basis covers what its layers receive, on real slices (CPU, no training).

    .venv/bin/python Training/scripts/basis_coverage.py [--grids 8] [-o coverage.json]

For the study's layer and the three fixes (wide, layernorm, post_relu; Training/configs/
basis_ablation.yaml), a freshly initialised KANU-Net 2D in training mode (BatchNorm on batch
statistics, as in training) runs 16 HDF5 validation-pool slices; hooks record what the spline
branch of every KAN convolution after the first sees. Per variant: the share of those inputs
where no basis function exceeds 0.1 (the input is invisible to the spline), and the share of
basis functions whose mean activation is below 0.01 (centres that never fire, so their weights
get no gradient). Measured at initialisation: after BatchNorm and ReLU the inputs are half zeros
and half |N(0, 1)|-like whatever the weights, so this is the range a trained layer sees too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from KANTumorSegLib.kan_layers import FastKANConv2d
from KANTumorSegLib.preprocessing import PreprocessingConfig
from KANTumorSegLib.unet import KANUNet2D, ModelConfig
from Training.data import load_hdf5

VARIANTS = {
    "study": {},
    "wide": {"grid_min": -2.0, "grid_max": 2.0},
    "layernorm": {"basis_norm": "layer", "grid_min": -2.0, "grid_max": 2.0},
    "post_relu": {"grid_placement": "post_relu"},
}


def coverage(config: ModelConfig, inputs: torch.Tensor) -> dict:
    torch.manual_seed(0)
    model = KANUNet2D(config).train()
    layers = [m for m in model.modules() if isinstance(m, FastKANConv2d) and m is not model.inc[0]]
    seen: list[torch.Tensor] = []

    def hook(layer, args):
        x = args[0]
        spline_input = x if layer.norm is None else layer.norm(x)
        seen.append(layer.basis(spline_input).unflatten(1, (layer.basis.num_functions, -1)).detach())

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    with torch.no_grad():
        model(inputs)
    for handle in handles:
        handle.remove()
    invisible = [float((b.amax(dim=1) < 0.1).float().mean()) for b in seen]
    idle = [float((b.mean(dim=(0, 2, 3, 4)) < 0.01).float().mean()) for b in seen]
    weights = [b[0].numel() / b.shape[1] for b in seen]
    return {"inputs_without_basis_above_0.1": float(np.average(invisible, weights=weights)),
            "idle_basis_functions": float(np.mean(idle)),
            "worst_layer_inputs_without_basis": float(max(invisible))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grids", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--root", type=Path, default=Path("../shared/data/brats_samples"))
    parser.add_argument("--cache", type=Path, default=Path(".cache/slices_q8"))
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args()
    slices = load_hdf5(args.root, args.cache, PreprocessingConfig())
    inputs = torch.from_numpy(slices.inputs[:16].astype(np.float32))
    result = {}
    print("| basis | grids | inputs with no basis above 0.1 | idle basis functions | worst layer |")
    print("|---|---|---|---|---|")
    for name, settings in VARIANTS.items():
        for grids in args.grids:
            figures = coverage(ModelConfig(num_grids=grids, **settings), inputs)
            result[f"{name}_g{grids}"] = figures
            print(f"| {name} | {grids} | {figures['inputs_without_basis_above_0.1']:.1%} | "
                  f"{figures['idle_basis_functions']:.1%} | {figures['worst_layer_inputs_without_basis']:.1%} |", flush=True)
    if args.output:
        args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
