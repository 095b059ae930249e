"""Speed and memory of ``kantumorseg segment`` next to its peers, in one process on one device.

For KANU-Net 2D (each width asked for), the plain-Conv2d U-Net of the same topology, MONAI
BasicUNet 2D and MONAI SegResNet 3D (init_filters 16, 4 in, 3 out) it times:

- ``model``: the network alone over the case's preprocessed brain slices (224 x 224 crops, the
  library's layout and precision policy), or for SegResNet one forward pass over the whole
  volume (padded to a multiple of 8);
- ``command``: the whole command on the case: read the four NIfTI files, preprocess, infer,
  write every output (labelmap, .seg.nrrd, volumes, overview). For the KANU-Net models this
  is ``kantumorseg segment`` itself (``cli.main``); the peers run the same reading and writing
  code around their own forward pass.

It prints seconds per case, slices per second, peak memory (RSS high-water mark on the CPU, reset
between rows through /proc/self/clear_refs; ``torch.cuda.max_memory_allocated`` on CUDA), ratios
to SegResNet, achieved TFLOP/s (FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode``) and
the device's measured matrix rate and copy bandwidth, then the accuracy check: the optimised path
must keep the labelmap of a float32 reference implementation (the plain two-branch KAN formula,
per-slice 224 crops, NCHW) with Dice >= 0.99 per region (WT, TC, ET) on each 3D case.

Untrained (seeded random) weights unless ``--model`` names a trained weights file; random
networks predict "tumour" in the background too, so the accuracy check counts voxels inside the
brain only (a trained model predicts none outside it).

    .venv/bin/python Testing/benchmarks/benchmark.py --device cpu --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from KANTumorSegLib.inference import SlicePredictor, choose_precision, native_cpu_bf16, segment_volume  # noqa: E402
from KANTumorSegLib.kan_layers import FastKANConv2d, GaussianRBF  # noqa: E402
from KANTumorSegLib.labels import REGIONS, region_mask  # noqa: E402
from KANTumorSegLib.preprocessing import PreprocessingConfig, paste, preprocess_slice, volume_ranges  # noqa: E402
from KANTumorSegLib.unet import KANUNet2D, ModelConfig, decode_logits  # noqa: E402
from KANTumorSegLib.weights import card_path, read_card  # noqa: E402
from Training.metrics import dice  # noqa: E402

SAMPLES = Path(os.environ.get("KANTUMORSEG_SAMPLES", REPO.parent / "shared" / "data" / "brats_samples"))
CASES = {
    "BraTS20_Training_001": "HunorLaczko_IPCV-TRDP_BraTS_2020/example/BraTS20_Training_001",
    "Brats18_2013_2_1": "IAmSuyogJadhav_Brainy/Brats18_2013_2_1",
    "BraTS2021_00000": "DevNazrin_brats-segmentation-study/example_case",
}


# ----------------------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window: CUDA's allocator peak, or the process's RSS high-water
    mark (writing 5 to /proc/self/clear_refs resets VmHWM on Linux)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


WARMUP = 1
"""Untimed calls before each measurement (``--warmup``); 0 suits the CPU, whose runs take seconds."""


def timed(fn, device: torch.device, repeats: int = 1) -> tuple[float, float]:
    """(median seconds of ``repeats`` calls after WARMUP untimed calls, peak memory in GiB)."""
    for _ in range(WARMUP):
        fn()
    sync(device)
    reset_peak(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times)), peak_gib(device)


def flops_of(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def ceilings(device: torch.device) -> dict:
    """Measured matrix rate (float32 and bf16) and copy bandwidth (bytes read + written)."""
    n = 8192 if device.type == "cuda" else 2048
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        seconds, _ = timed(lambda a=a, b=b: a @ b, device, repeats=5 if device.type == "cuda" else 2)
        out[f"matmul_{name}_tflops"] = 2 * n**3 / seconds / 1e12
    source = torch.randn(2**28 if device.type == "cuda" else 2**25, device=device)
    target = torch.empty_like(source)
    seconds, _ = timed(lambda: target.copy_(source), device, repeats=5)
    out["copy_gb_s"] = 2 * source.numel() * 4 / seconds / 1e9
    return out


# ----------------------------------------------------------------------------- models
class ReferenceKANConv2d(nn.Module):
    """The FastKAN formula written out, float32 and NCHW: conv(SiLU(x), W_base) +
    conv(rbf(x), W_spline), with rbf_{g,c}(x) = exp(-((x_c - centre_g) * inv_width)^2).
    It shares the optimised layer's weights; the benchmark's reference, not the library's."""

    def __init__(self, layer: FastKANConv2d) -> None:
        super().__init__()
        assert isinstance(layer.basis, GaussianRBF), "the reference covers the Gaussian basis"
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, basis = self.layer.conv, self.layer.basis
        base, spline = self.layer.split_weights()
        rbf = [torch.exp(-(((x - centre) * basis.inv_width) ** 2)) for centre in basis.centres.tolist()]
        return (F.conv2d(F.silu(x), base, conv.bias, padding=conv.padding)
                + F.conv2d(torch.cat(rbf, dim=1), spline, None, padding=conv.padding))


def reference_model(model: KANUNet2D) -> nn.Module:
    """A copy of ``model`` whose every FastKAN layer runs the reference formula."""
    import copy

    reference = copy.deepcopy(model).float().eval()
    for module in list(reference.modules()):
        for name, child in module.named_children():
            if isinstance(child, FastKANConv2d):
                setattr(module, name, ReferenceKANConv2d(child))
    return reference


class Configured(nn.Module):
    """A peer 2D network with the ``config.head`` attribute SlicePredictor reads."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.config = ModelConfig()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


def calibrate(model: KANUNet2D, inputs: np.ndarray) -> KANUNet2D:
    """Give a random network a trained network's scales: BatchNorm statistics from real slices
    (activations of unit size in every layer, logits of order 1 instead of 1e-3), then the head
    bias centred so that every class wins somewhere. Without this a random network predicts one
    class everywhere, from near-tied logits, and the accuracy check says nothing."""
    sample = torch.from_numpy(inputs[:: max(1, len(inputs) // 8)])
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batches
    model.train()
    with torch.no_grad():
        for start in range(0, len(sample), 4):
            model(sample[start:start + 4])
    model.eval()
    with torch.no_grad():
        model.head.conv.bias -= model(sample).mean(dim=(0, 2, 3))
    return model


def build_models(widths: list[int], model_path: Path | None, inputs: np.ndarray) -> dict[str, nn.Module]:
    from monai.networks.nets import BasicUNet, SegResNet

    torch.manual_seed(0)
    models: dict[str, nn.Module] = {}
    trained = None
    if model_path is not None:
        from KANTumorSegLib.weights import load_model

        trained = load_model(model_path)[0]
    for width in widths:
        if trained is not None and trained.config.base_width == width:
            models[f"KANU-Net w{width} (trained)"] = trained
        else:
            models[f"KANU-Net w{width}"] = calibrate(KANUNet2D(ModelConfig(base_width=width)), inputs)
        models[f"plain U-Net w{width}"] = KANUNet2D(ModelConfig(base_width=width, conv="plain")).eval()
    models["BasicUNet 2D"] = Configured(BasicUNet(spatial_dims=2, in_channels=4, out_channels=4)).eval()
    models["SegResNet 3D"] = SegResNet(spatial_dims=3, init_filters=16, in_channels=4, out_channels=3).eval()
    return models


# ----------------------------------------------------------------------------- data
def case_files(name: str) -> dict[str, Path]:
    folder = SAMPLES / CASES[name]
    if not folder.is_dir():
        folder = REPO / ".device" / "bench" / "case"  # what the GPU run carries
    return {m: folder / f"{name}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg")}


def read_volume(name: str):
    from KANTumorSegLib.volumes import load_case

    files = case_files(name)
    return load_case({m: files[m] for m in ("t1", "t1ce", "t2", "flair")})


def brain_slices(volume: np.ndarray, config: PreprocessingConfig) -> tuple[np.ndarray, list]:
    """The reference preprocessing: (N, 4, 224, 224) crops of the brain slices and their boxes
    (with "volume" scaling, by the whole volume's ranges, as segment_volume does)."""
    inputs, boxes = [], []
    ranges = volume_ranges(volume, config)
    for z in range(volume.shape[3]):
        prepared = preprocess_slice(volume[..., z], config, ranges)
        if prepared is not None:
            inputs.append(prepared[0])
            boxes.append((z, prepared[1]))
    return np.stack(inputs), boxes


def brain_of(volume: np.ndarray) -> np.ndarray:
    """(X, Y, Z) mask of voxels above the volume's minimum in any modality: the brain."""
    return (volume > volume.reshape(4, -1).min(axis=1)[:, None, None, None]).any(axis=0)


def segresnet_input(volume: np.ndarray) -> np.ndarray:
    """Auto3DSeg-style input: each modality z-scored over the brain, depth padded to a multiple of 8."""
    # MONAI reads a case into arrays of its own; load_case's volume is a transposed view, on
    # which the boolean gathers below took 0.34 s instead of 0.08 s (2 cores).
    volume = np.ascontiguousarray(volume)
    brain = brain_of(volume)
    out = np.zeros_like(volume)
    for c in range(4):
        values = volume[c][brain]
        out[c][brain] = (values - values.mean()) / max(values.std(), 1e-6)
    pad = (-volume.shape[3]) % 8
    return np.pad(out, ((0, 0), (0, 0), (0, 0), (0, pad)))[None]


# ----------------------------------------------------------------------------- forward passes
def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def concatenated_expansion(self: FastKANConv2d, x: torch.Tensor) -> torch.Tensor:
    """The expansion before this work, for the "before" rows: torch.cat of NCHW branches."""
    return torch.cat([F.silu(x), self.basis(x)], dim=1)


def model_alone_2d(model: nn.Module, inputs: np.ndarray, device: torch.device, batch: int, before: bool = False,
                   precision: str = "float32"):
    """Forward passes over every slice, the library's way (channels last, the command's
    precision for this model), or with ``before`` the way of the first version (NCHW,
    concatenated expansion)."""
    predictor = SlicePredictor(model, device, batch, precision)
    layout = torch.contiguous_format if before else torch.channels_last
    model = predictor.model.to(memory_format=layout)
    x = torch.from_numpy(inputs).to(device).contiguous(memory_format=layout)

    def run() -> None:
        fast = FastKANConv2d.expand
        if before:
            FastKANConv2d.expand = concatenated_expansion
        try:
            with torch.inference_mode(), autocast(device, predictor.dtype):
                for start in range(0, len(x), batch):
                    model(x[start:start + batch])
        finally:
            FastKANConv2d.expand = fast

    return run, predictor.dtype


def segresnet_forward(model: nn.Module, volume: np.ndarray, device: torch.device, dtype: torch.dtype):
    model = model.to(device)
    x = torch.from_numpy(segresnet_input(volume)).to(device)

    def run() -> torch.Tensor:
        with torch.inference_mode(), autocast(device, dtype):
            return model(x)

    return run


def peer_command(model: nn.Module, name: str, device: torch.device, dtype: torch.dtype, out_dir: Path) -> None:
    """The peers' whole command: the library's reading and writing around their forward pass."""
    import SimpleITK as sitk

    from KANTumorSegLib.measurements import tumour_volumes
    from KANTumorSegLib.outputs import output_names, write_labelmap, write_segmentation, write_volumes
    from KANTumorSegLib.overview import write_overview
    from KANTumorSegLib.volumes import labels_to_reference

    volume, grid = read_volume(name)
    if isinstance(model, Configured):
        labels = segment_volume(volume, SlicePredictor(model, device), PreprocessingConfig())
    else:
        logits = segresnet_forward(model, volume, device, dtype)()
        labels = decode_logits(logits[..., : volume.shape[3]].float(), "regions")[0].cpu().numpy()
    reference = labels_to_reference(labels, grid)
    names = output_names(name)
    write_labelmap(out_dir / names["labelmap"], reference, "brats2020")
    write_segmentation(out_dir / names["segmentation"], reference)
    volumes = tumour_volumes(sitk.GetArrayViewFromImage(reference), reference.GetSpacing())
    write_volumes(out_dir / names["volumes_json"], out_dir / names["volumes_csv"], volumes, {"case": name})
    write_overview(out_dir / names["overview"], volume, labels, volumes)


def train_throughput(model: KANUNet2D, inputs: np.ndarray, device: torch.device, batch: int, steps: int) -> dict:
    """Training steps per second at a fixed batch, through Training's own step (train_step.py):
    bf16 autocast on CUDA (float32 on the CPU), BCE + batch Dice loss on the head's targets,
    AdamW. A copy of the model trains (the timing rows and the accuracy check keep
    their weights). The targets are seeded random BraTS labels: a step's time does not depend
    on their values. FLOPs: one eager step counted (forward and backward)."""
    import copy

    from monai.losses import DiceLoss

    from Training.config import DEFAULTS
    from Training.train import targets
    from Training.train_step import TrainStep

    cfg = DEFAULTS["train"]
    net = copy.deepcopy(model).to(device).train()
    dice_loss, bce_loss = DiceLoss(sigmoid=True, batch=True), nn.BCEWithLogitsLoss()

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cfg["bce_weight"] * bce_loss(logits, target) + dice_loss(logits, target)

    dtype = torch.bfloat16 if device.type == "cuda" else None
    x = torch.from_numpy(np.resize(inputs, (batch, *inputs.shape[1:]))).to(device)
    labels = torch.from_numpy(np.random.default_rng(0).choice([0, 1, 2, 4], size=(batch, *inputs.shape[2:]))).to(device)
    target = targets(labels, net.config.head)

    # Training sets cudnn.benchmark (every batch has one shape); the inference rows run without it.
    benchmark_flag = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda"
    try:
        step = TrainStep(net, torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"]),
                         loss_fn, dtype)
        flops = flops_of(lambda: step(x, target))
        seconds, peak = timed(lambda: [step(x, target) for _ in range(steps)], device)
    finally:
        torch.backends.cudnn.benchmark = benchmark_flag
    return {"model": f"KANU-Net w{model.config.base_width}", "batch": batch, "steps": steps,
            "dtype": str(dtype or torch.float32)[6:], "step_s": seconds / steps,
            "slices_per_s": batch * steps / seconds, "peak_gib": peak, "flops_step": flops,
            "tflops": flops * steps / seconds / 1e12}


def save_weights(model: KANUNet2D, folder: Path) -> Path:
    from KANTumorSegLib.weights import save_model

    path = folder / f"bench_{model.config.conv}_w{model.config.base_width}.safetensors"
    if not path.exists():
        save_model(model.cpu(), path, {"name": path.stem, "preprocessing": PreprocessingConfig().to_dict(),
                                       "labels": "brats2020", "training": "none: random weights for timing"})
    return path


# ----------------------------------------------------------------------------- accuracy
def reference_labels(model: KANUNet2D, volume: np.ndarray, device: torch.device,
                     config: PreprocessingConfig) -> np.ndarray:
    """Labels of the float32 reference: the two-branch formula on every 224 brain crop (TF32 off)."""
    reference = reference_model(model.cpu()).to(device)
    inputs, boxes = brain_slices(volume, config)
    labels = np.zeros(volume.shape[1:], dtype=np.uint8)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    with torch.inference_mode():
        for start in range(0, len(inputs), 8):
            logits = reference(torch.from_numpy(inputs[start:start + 8]).to(device)).cpu()
            for (z, box), window in zip(boxes[start:start + 8], decode_logits(logits, model.config.head).numpy()):
                labels[..., z] = paste(window, box, volume.shape[1:3])
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return labels


def accuracy(model: KANUNet2D, device: torch.device, cases: list[str], cpu_bf16: bool = False,
             command_precision: str = "float32", config: PreprocessingConfig | None = None) -> list[dict]:
    """Dice per region between the reference and the library's path in float32 and in bf16
    (on CUDA always; on the CPU when asked or when the command uses it for this model).
    ``command_path`` marks the precision the command itself uses: only its row must pass.
    ``config``: the model card's preprocessing (default: the study's)."""
    config = config or PreprocessingConfig()
    rows = []
    for name in cases:
        volume, _ = read_volume(name)
        brain = brain_of(volume)
        expected = reference_labels(model, volume, device, config)
        variants = ["float32"] + (["bfloat16"] if device.type == "cuda" or cpu_bf16 or command_precision == "bfloat16" else [])
        for variant in variants:
            predictor = SlicePredictor(model, device, precision=variant)
            got = segment_volume(volume, predictor, config)
            dtype = predictor.precision
            if device.type == "cuda" and predictor.dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
                dtype += " (cuDNN TF32)"
            row = {"case": name, "dtype": dtype, "voxels_differing": int((expected != got).sum()),
                   "command_path": variant == command_precision}
            for region in REGIONS:
                reference = region_mask(expected, region) & brain
                row[region] = dice(reference, region_mask(got, region) & brain)
                row[f"{region}_voxels"] = int(reference.sum())
            rows.append(row)
            print(json.dumps(row), flush=True)
        model.cpu()
    return rows


def record_cpu_bf16_check(args: argparse.Namespace, rows: list[dict], device: torch.device) -> None:
    """Write the CPU bf16 rows of the trained model into its card (``inference.cpu_bfloat16_check``)
    when all of them pass; otherwise leave the card alone and say why."""
    width = read_card(args.model)["model"]["base_width"] if args.model else None
    bf16 = [r for r in rows if r["width"] == width and r["dtype"] == "bfloat16"]
    if device.type != "cpu" or not bf16:
        print("--record-cpu-bf16-check needs --device cpu, --model and --try-cpu-bf16; the card was left as it was.")
        return
    failed = [r["case"] for r in bf16 if not min(r[region] for region in REGIONS) >= 0.99]
    if failed:
        print(f"bf16 failed the check on {', '.join(failed)}; {card_path(args.model)} was left as it was.")
        return
    card = json.loads(card_path(args.model).read_text())
    card["inference"] = {"cpu_bfloat16_check": {
        "rule": "Dice >= 0.99 per region (WT, TC, ET) inside the brain against the float32 reference formula, on each case",
        "command": " ".join(sys.argv), "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "cases": {r["case"]: {**{region: round(r[region], 4) for region in REGIONS}, "voxels_differing": r["voxels_differing"]}
                  for r in bf16}}}
    card["sha256"] = card.pop("sha256")  # keep the checksum last, as the exporter writes it
    card_path(args.model).write_text(json.dumps(card, indent=2) + "\n")
    print(f"recorded the passed CPU bf16 check in {card_path(args.model)}")


def small_gpu(model: KANUNet2D, inputs: np.ndarray, device: torch.device, gib: float) -> list[dict]:
    """The command's predictor on a GPU cut down to ``gib`` GiB, two real ways, no mock:

    - ``free memory``: a blocking allocation leaves ``gib`` GiB free, as on a small laptop GPU;
      the predictor measures one slice and picks the batch from torch.cuda.mem_get_info.
    - ``allocator cap``: torch.cuda.set_per_process_memory_fraction caps the allocator while
      mem_get_info still reports the whole card, so the measured batch is too large and the
      run must go on through out-of-memory halving.
    Labels must equal those of an uncapped run at the same batch sizes' precision."""
    import warnings

    asked = 1024
    expected = SlicePredictor(model, device, batch_size=32).predict(inputs)
    rows = []
    for how in ("free memory", "allocator cap"):
        torch.cuda.empty_cache()
        blocker = None
        free, total = torch.cuda.mem_get_info(device)
        if how == "free memory":
            blocker = torch.empty(int(free - gib * 2**30), dtype=torch.uint8, device=device)
        else:
            torch.cuda.set_per_process_memory_fraction(gib * 2**30 / total, torch.cuda.current_device())
        predictor = SlicePredictor(model, device, batch_size=asked)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            try:
                got = predictor.predict(inputs)
                outcome = {"equal": bool(np.array_equal(got, expected)), "differing": int((got != expected).sum())}
            except Exception as error:  # noqa: BLE001 - report what a small GPU would show the user
                outcome = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            seconds = time.perf_counter() - start
        rows.append({"how": how, "gib": gib, "asked": asked, "batch": predictor.batch_size, "device_after": str(predictor.device),
                     "seconds": seconds, "warnings": [str(w.message) for w in caught], **outcome})
        del blocker
        torch.cuda.set_per_process_memory_fraction(1.0, torch.cuda.current_device())
        torch.cuda.empty_cache()
    model.cpu()
    return rows


COLD_RUN = """
import atexit, runpy, sys
def report_peak():
    peak = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print("VmHWM_kB", peak, file=sys.stderr)
atexit.register(report_peak)
sys.argv = ["kantumorseg", *sys.argv[1:]]
runpy.run_module("KANTumorSegLib", run_name="__main__")
"""
"""The command as ``python -m KANTumorSegLib``, printing its peak RSS at exit. VmHWM is read inside
the child because its rusage peak would count the forking benchmark's pages too."""


def cold_command(weights: Path, case_dir: Path, device: str, batch: int, out_dir: Path) -> dict:
    """``python -m KANTumorSegLib segment`` in a fresh process, as a user runs it: Python, torch
    and CUDA start-up included. Wall time and that process's own peak RSS."""
    import subprocess

    command = [sys.executable, "-c", COLD_RUN, "segment", str(case_dir), "-o", str(out_dir), "--model", str(weights),
               "--device", device, "--progress", "none", "--overwrite", "--batch-size", str(batch)]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    peaks = [int(line.split()[1]) for line in result.stderr.splitlines() if line.startswith("VmHWM_kB")]
    return {"weights": weights.name, "seconds": seconds, "peak_rss_gib": peaks[-1] / 2**20 if peaks else float("nan"),
            "exit": result.returncode, "stderr": result.stderr[-300:]}


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's")
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16], help="KANU-Net base widths")
    parser.add_argument("--model", type=Path, default=None, help="a trained weights file to use for its width")
    parser.add_argument("--case", default="BraTS20_Training_001", choices=sorted(CASES))
    parser.add_argument("--batch", type=int, default=16, help="slices per forward pass")
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats per row (median)")
    parser.add_argument("--accuracy-cases", nargs="*", default=sorted(CASES), help="3D cases for the accuracy check")
    parser.add_argument("--accuracy-widths", type=int, nargs="*", default=None, help="KANU-Net widths to check (default: all)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before each timing")
    parser.add_argument("--accuracy-only", action="store_true", help="skip the timings")
    parser.add_argument("--try-cpu-bf16", action="store_true", help="add a bf16 row to the CPU accuracy check")
    parser.add_argument("--record-cpu-bf16-check", action="store_true",
                        help="with --model and --try-cpu-bf16 on the CPU: when every bf16 row of that model passes, write the "
                             "check into its card, which lets --precision auto run it in bf16 on CPUs with native bf16")
    parser.add_argument("--skip", nargs="*", default=[], help="rows to leave out (substring of the model name)")
    parser.add_argument("--before", type=int, nargs="*", default=[], help="widths to time the first version's model for")
    parser.add_argument("--work", type=Path, default=None, help="folder for weights and outputs (default: a new temp folder)")
    parser.add_argument("--small-gpu", type=float, default=0, help="also run the predictor on a GPU cut down to this many GiB")
    parser.add_argument("--train-batch", type=int, default=32, help="slices per training step")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="timed training steps per KANU-Net width (default: 20 on CUDA, 0 on the CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    global WARMUP
    WARMUP = args.warmup
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "load_average_start": os.getloadavg(), "rows": []}
    report["ceilings"] = ceilings(device)
    print(f"# {report['device']}, {report['threads']} threads, torch {torch.__version__}, load {os.getloadavg()[0]:.1f}; "
          + ", ".join(f"{k} {v:.2f}" for k, v in report["ceilings"].items()), flush=True)

    volume, _ = read_volume(args.case)
    inputs, _ = brain_slices(volume, PreprocessingConfig())
    models = {k: v for k, v in build_models(args.widths, args.model, inputs).items() if not any(s in k for s in args.skip)}
    n_slices = len(inputs)
    work = args.work or Path(tempfile.mkdtemp(prefix="kts-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    native_dtype = torch.bfloat16 if device.type == "cuda" or native_cpu_bf16() else torch.float32
    trained = next((m for k, m in models.items() if k.endswith("(trained)")), None)
    # Read (and checksum) the card once, not inside the timed segment_volume calls.
    trained_precision = choose_precision("auto", device, read_card(args.model)) if trained is not None else "float32"
    trained_preprocessing = (PreprocessingConfig.from_dict(read_card(args.model)["preprocessing"]) if trained is not None
                             else PreprocessingConfig())

    def preprocessing_of(model: nn.Module) -> PreprocessingConfig:
        """The trained model's card says how its inputs are scaled; the random networks take the default."""
        return trained_preprocessing if model is trained else PreprocessingConfig()

    def precision_of(model: nn.Module) -> str:
        """The command's --precision auto for this model: the trained model's card may allow
        bf16 on this CPU; the random networks' cards record no accuracy check."""
        return trained_precision if model is trained else "float32"

    def weights_for(model: KANUNet2D) -> Path:
        """The file the command loads: the trained model's own, or the random network saved."""
        return args.model if model is trained else save_weights(model, work)

    for label, model in ({} if args.accuracy_only else models).items():
        row: dict = {"model": label, "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
        try:
            if label.startswith("SegResNet"):
                # A Slicer user's SegResNet runs float32 on the CPU; bf16 is timed too where native.
                for dtype in dict.fromkeys((torch.float32, native_dtype)):
                    run = segresnet_forward(model, volume, device, dtype)
                    suffix = "" if dtype == torch.float32 else " bf16"
                    row[f"model_s{suffix}"], row[f"model_peak_gib{suffix}"] = timed(run, device, args.repeats)
                small = torch.zeros(1, 4, 96, 96, 64, device=device)
                with torch.inference_mode():
                    row["flops_case"] = flops_of(lambda m=model, s=small: m(s)) * (240 * 240 * 160) / (96 * 96 * 64)
                row["model_dtype"] = "float32"
            else:
                run, dtype = model_alone_2d(model, inputs, device, args.batch, precision=precision_of(model))
                row["model_s"], row["model_peak_gib"] = timed(run, device, args.repeats)
                row["model_dtype"] = str(dtype).replace("torch.", "")
                one = torch.from_numpy(inputs[:1]).to(device)
                with torch.inference_mode():
                    row["flops_case"] = flops_of(lambda m=model, one=one: m.to(device)(one)) * n_slices
                row["slices_per_s"] = n_slices / row["model_s"]
            row["model_tflops"] = row["flops_case"] / row["model_s"] / 1e12

            if isinstance(model, KANUNet2D):
                row["segment_s"], _ = timed(lambda m=model: segment_volume(
                    volume, SlicePredictor(m, device, args.batch, precision_of(m)), preprocessing_of(m)), device, args.repeats)
            if isinstance(model, KANUNet2D) and model.config.conv == "kan" and model.config.base_width in args.before:
                run, _ = model_alone_2d(model, inputs, device, args.batch, before=True)
                row["before_model_s"], row["before_model_peak_gib"] = timed(run, device, args.repeats)
            out_dir = work / label.replace(" ", "_").replace("(", "").replace(")", "")
            out_dir.mkdir(exist_ok=True)
            if isinstance(model, KANUNet2D):
                from KANTumorSegLib.cli import main as kantumorseg

                weights = weights_for(model)
                folder = case_files(args.case)["t1ce"].parent
                command = ["segment", str(folder), "-o", str(out_dir), "--model", str(weights), "--device", args.device,
                           "--progress", "none", "--overwrite", "--batch-size", str(args.batch)]

                def run_command(command=command) -> None:
                    with contextlib.redirect_stdout(io.StringIO()):
                        assert kantumorseg(command) == 0

                row["command_s"], row["command_peak_gib"] = timed(run_command, device, args.repeats)
            else:
                row["command_s"], row["command_peak_gib"] = timed(
                    lambda m=model, d=out_dir: peer_command(m, args.case, device, native_dtype, d), device, args.repeats)
        except Exception as error:  # noqa: BLE001 - one failing row must not lose the others
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        model.cpu()
        report["rows"].append(row)
        print(json.dumps(row), flush=True)

    seg = next((r for r in report["rows"] if r["model"].startswith("SegResNet")), None)
    peer_s = min(seg.get("model_s", np.inf), seg.get("model_s bf16", np.inf)) if seg else float("nan")
    kan = [m for m in models.values() if isinstance(m, KANUNet2D) and m.config.conv == "kan"]
    report["cold"] = [] if args.accuracy_only else [
        cold_command(weights_for(m), case_files(args.case)["t1ce"].parent, args.device, args.batch,
                     work / f"cold_w{m.config.base_width}") for m in kan]
    for row in report["cold"]:
        print(json.dumps(row), flush=True)
    if args.small_gpu and device.type == "cuda":
        widest = max(kan, key=lambda m: m.config.base_width)
        report["small_gpu"] = small_gpu(widest, inputs, device, args.small_gpu)
        for row in report["small_gpu"]:
            print(json.dumps(row), flush=True)
    report["accuracy"] = []
    for m in kan:
        if args.accuracy_widths is not None and m.config.base_width not in args.accuracy_widths:
            continue
        try:
            checked = accuracy(m, device, args.accuracy_cases, args.try_cpu_bf16, precision_of(m), preprocessing_of(m))
            report["accuracy"] += [dict(width=m.config.base_width, **row) for row in checked]
        except Exception as error:  # noqa: BLE001 - keep the timing tables
            print(f"accuracy check of width {m.config.base_width} failed: {type(error).__name__}: {error}", flush=True)
            report["accuracy"].append({"width": m.config.base_width, "case": "-", "dtype": "-", "voxels_differing": -1,
                                       **{r: float("nan") for r in REGIONS}})
    if args.record_cpu_bf16_check:
        record_cpu_bf16_check(args, report["accuracy"], device)
    if args.json:  # the numbers so far, in case the training rows below never return
        args.json.write_text(json.dumps(report, indent=2, default=str))
    # Training last: an out-of-memory step there must not spoil the checks above.
    train_steps = args.train_steps if args.train_steps is not None else (20 if device.type == "cuda" else 0)
    report["training"] = []
    for m in (kan if train_steps and not args.accuracy_only else []):
        try:
            row = train_throughput(m, inputs, device, args.train_batch, train_steps)
            rate = report["ceilings"]["matmul_bf16_tflops" if row["dtype"] == "bfloat16" else "matmul_fp32_tflops"]
            row["fraction_of_matmul_rate"] = row["tflops"] / rate
        except Exception as error:  # noqa: BLE001 - keep the timing tables
            row = {"model": f"KANU-Net w{m.config.base_width}", "error": f"{type(error).__name__}: {str(error)[:300]}"}
        m.cpu()
        report["training"].append(row)
        print(json.dumps(row), flush=True)
    report["load_average_end"] = os.getloadavg()

    print(f"\n## {args.case}: {n_slices} brain slices, {report['device']}, {report['threads']} threads, "
          f"load average {report['load_average_start'][0]:.1f} -> {report['load_average_end'][0]:.1f}")
    print("| model | params (M) | precision | model s/case | slices/s | model peak GiB | command s/case | command peak GiB "
          "| command / SegResNet | TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in report["rows"]:
        if "error" in row:
            print(f"| {row['model']} | failed: {row['error']} |")
            continue
        print(f"| {row['model']} | {row['params_M']:.2f} | {row['model_dtype']} | {row['model_s']:.2f}"
              + (f" (bf16 {row['model_s bf16']:.2f})" if "model_s bf16" in row else "")
              + (f" (first version {row['before_model_s']:.2f})" if "before_model_s" in row else "")
              + (f"; segment_volume {row['segment_s']:.2f}"
                 if "segment_s" in row else "")
              + f" | {row.get('slices_per_s', float('nan')):.1f} | {row['model_peak_gib']:.2f} | {row['command_s']:.2f} "
              f"| {row['command_peak_gib']:.2f} | {row['command_s'] / peer_s:.2f} | {row['model_tflops']:.2f} |")
    print("\n| cold command (fresh process) | seconds | peak RSS GiB | exit |")
    print("|---|---|---|---|")
    for row in report["cold"]:
        print(f"| {row['weights']} | {row['seconds']:.2f} | {row['peak_rss_gib']:.2f} | {row['exit']} |")
    if report["training"]:
        print("\n| training (fwd + bwd + AdamW) | batch | precision | s/step | slices/s | peak GiB | TFLOP/s "
              "| of the measured matrix rate |")
        print("|---|---|---|---|---|---|---|---|")
    for row in report["training"]:
        print(f"| {row['model']} | failed: {row['error']} |" if "error" in row else
              f"| {row['model']} | {row['batch']} | {row['dtype']} | {row['step_s']:.4f} | {row['slices_per_s']:.1f} "
              f"| {row['peak_gib']:.2f} | {row['tflops']:.2f} | {row['fraction_of_matmul_rate']:.1%} |")
    print("\n| width | case | precision | WT Dice | TC Dice | ET Dice | voxels differing | pass (>= 0.99) |")
    print("|---|---|---|---|---|---|---|---|")
    ok = True
    for row in report["accuracy"]:
        passed = all(row[r] >= 0.99 for r in REGIONS)
        ok &= passed or not row.get("command_path", True)
        print(f"| {row['width']} | {row['case']} | {row['dtype']} | {row['WT']:.4f} | {row['TC']:.4f} | {row['ET']:.4f} "
              f"| {row['voxels_differing']} | {'yes' if passed else 'NO'} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
