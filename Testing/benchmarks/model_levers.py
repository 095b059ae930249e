"""GPU levers for the model's forward rate, measured side by side in one process.

Issue 5 asks for the KAN forward pass at 3x the naive prototype's 930 slices/s and within 2x of
the plain-Conv2d U-Net. This times the shipped model over BraTS20_Training_001's 135 brain crops
(channels last, batch 64) with one lever changed at a time against the eager expansion in float32
with TF32 convolutions (``KANTUMORSEG_TRITON`` unset or 0, the library's default): the fused
Triton expansion (``KANTUMORSEG_TRITON=1``, opt-in) in float32 and under bf16 autocast,
larger batches, cuDNN's autotuner (``cudnn.benchmark``) and ``torch.compile``. The first
version of the layer (NCHW, concatenated expansion) and the plain U-Net of the same topology,
in float32 and in bf16, run in the same process as references. Every lever's labels are
compared with the eager float32 path's: Dice per region (WT, TC, ET) over the 135 slices.

    python3 Testing/benchmarks/model_levers.py            # on the H200, wheels as in h200_bench.sh
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmark  # noqa: E402
from benchmark import brain_slices, model_alone_2d, read_volume, timed  # noqa: E402

from KANTumorSegLib import kan_triton  # noqa: E402
from KANTumorSegLib.labels import REGIONS, region_mask  # noqa: E402
from KANTumorSegLib.unet import KANUNet2D, ModelConfig, decode_logits  # noqa: E402
from KANTumorSegLib.weights import default_model_path, load_model  # noqa: E402
from Training.metrics import dice  # noqa: E402


def rate(run, n_slices: int, device: torch.device, repeats: int = 5) -> float:
    """Slices per second: the benchmark's own timing (median of ``repeats`` calls after its
    untimed warm-up calls)."""
    return n_slices / timed(run, device, repeats)[0]


def labels_of(model: torch.nn.Module, x: torch.Tensor, batch: int, head: str, dtype: torch.dtype = torch.float32) -> np.ndarray:
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        return np.concatenate([decode_logits(model(x[s:s + batch]).float(), head).cpu().numpy()
                               for s in range(0, len(x), batch)])


def dice_against(reference: np.ndarray, labels: np.ndarray) -> str:
    return " / ".join(f"{dice(region_mask(labels, r), region_mask(reference, r)):.4f}" for r in REGIONS)


def compiled_row(model: torch.nn.Module, x: torch.Tensor, n: int, head: str, reference: np.ndarray, device: torch.device,
                 repeats: int) -> tuple[str, float, str]:
    """The torch.compile row; a compiler failure becomes the row's note, not the end of the run."""
    started = time.perf_counter()
    try:
        compiled = torch.compile(model)
        compiled_labels = labels_of(compiled, x, 64, head)
    except Exception as error:  # noqa: BLE001 - Inductor's failures are many kinds; the others' rows must print
        return "torch.compile, batch 64", float("nan"), f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    compile_s = time.perf_counter() - started

    def run_compiled() -> None:
        with torch.inference_mode():
            for s in range(0, n, 64):
                compiled(x[s:s + 64])

    return (f"torch.compile, batch 64 (first call incl. compile {compile_s:.1f} s)", rate(run_compiled, n, device, repeats),
            dice_against(reference, compiled_labels))


def triton_row(model: torch.nn.Module, inputs: np.ndarray, x: torch.Tensor, head: str, reference: np.ndarray,
               device: torch.device, repeats: int, eager: float, precision: str = "float32") -> tuple[str, float, str]:
    """The fused Triton expansion (KANTUMORSEG_TRITON=1, opt-in) in ``precision`` against the eager
    float32 one (=0, ``eager`` slices/s); a kernel failure becomes the row's note, not the end of the run."""
    name = f"Triton fused expansion (KANTUMORSEG_TRITON=1), {precision}, batch 64"
    if device.type != "cuda" or not kan_triton.available():
        return name, float("nan"), "skipped: needs Triton and a CUDA GPU"
    os.environ["KANTUMORSEG_TRITON"] = "1"  # FastKANConv2d.expand reads it at every call
    try:
        triton_labels = labels_of(model, x, 64, head, getattr(torch, precision))
        run, _ = model_alone_2d(model, inputs, device, 64, precision=precision)
        value = rate(run, len(inputs), device, repeats)
    except Exception as error:  # noqa: BLE001 - Triton's compile and launch failures are many kinds
        return name, float("nan"), f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    finally:
        os.environ["KANTUMORSEG_TRITON"] = "0"
    return f"{name}, x{value / eager:.2f} the eager float32", value, dice_against(reference, triton_labels)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a quick check of the script)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    benchmark.WARMUP = 2  # GPU rows: the first calls also pick kernels and fill the allocator
    device = torch.device(args.device)
    os.environ["KANTUMORSEG_TRITON"] = "0"  # the eager expansion, except in the Triton row
    model, card, config = load_model(default_model_path())
    inputs, _ = brain_slices(read_volume("BraTS20_Training_001")[0], config)
    n = len(inputs)
    head = card["model"]["head"]
    x = torch.from_numpy(inputs).to(device).contiguous(memory_format=torch.channels_last)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# {name}, torch {torch.__version__}, shipped model "
          f"({card['model']['num_grids']} grids, width {card['model']['base_width']}), {n} slices of 224 x 224")

    rows = []
    run, _ = model_alone_2d(model, inputs, device, 64)
    rows.append(("library path: eager expansion, float32/TF32, channels last, batch 64",
                 rate(run, n, device, args.repeats), "reference"))
    library = model.to(device)
    reference = labels_of(library, x, 64, head)
    rows.append(triton_row(library, inputs, x, head, reference, device, args.repeats, rows[0][1]))
    rows.append(triton_row(library, inputs, x, head, reference, device, args.repeats, rows[0][1], "bfloat16"))
    for batch in (128, 256):
        run, _ = model_alone_2d(model, inputs, device, batch)
        rows.append((f"eager, batch {batch}", rate(run, n, device, args.repeats),
                     dice_against(reference, labels_of(library, x, batch, head))))
    run, _ = model_alone_2d(model, inputs, device, 64, before=True)
    rows.append(("first version (NCHW, concatenated expansion), batch 64", rate(run, n, device, args.repeats), "same weights"))

    torch.backends.cudnn.benchmark = True
    run, _ = model_alone_2d(model, inputs, device, 64)
    rows.append(("eager, cudnn.benchmark, batch 64", rate(run, n, device, args.repeats),
                 dice_against(reference, labels_of(library, x, 64, head))))
    torch.backends.cudnn.benchmark = False

    rows.append(compiled_row(library, x, n, head, reference, device, args.repeats))

    # The plain U-Net at both precisions: issue 5's "within 2x" compares like with like.
    plain = KANUNet2D(ModelConfig(base_width=card["model"]["base_width"], conv="plain", head=head)).eval()
    for precision in ("float32", "bfloat16"):
        run, _ = model_alone_2d(plain, inputs, device, 64, precision=precision)
        rows.append((f"plain Conv2d U-Net, same topology, {precision}, batch 64", rate(run, n, device, args.repeats),
                     "untrained"))

    print("| variant | slices/s | x naive 930 | Dice WT / TC / ET against the library path |\n|---|---|---|---|")
    for name, value, agreement in rows:
        print(f"| {name} | {value:,.0f} | {value / 930:.2f} | {agreement} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
