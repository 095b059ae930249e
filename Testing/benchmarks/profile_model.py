"""Where the forward pass spends its device time: the shipped KANU-Net and the plain U-Net, by kernel kind.

Issue 5 wants the KAN forward pass within 2x of the plain-Conv2d U-Net of the same topology.
This profiles one batch (default 64) of BraTS20_Training_001's brain crops through each network
with ``torch.profiler``, the library's way (``benchmark.model_alone_2d``: channels last, float32
with TF32 convolutions on CUDA, or bf16 autocast with ``--precision bfloat16``), the shipped model
once with the fused Triton expansion (``KANTUMORSEG_TRITON=1``, where Triton and CUDA are there)
and once with the eager one (``=0``). Each configuration prints a table of device time (CUDA
kernels; on the CPU the self time of the aten operators) by category, in ms per batch and % of
the total, then its 10 most expensive kernels.

The categories are a heuristic: a kernel is placed by substrings of its own name (the Triton
kernel, cuDNN's layout conversions, copies) or of the operators that launched it (the layer's
``expand`` runs inside a ``kan_expansion`` profiler range this script adds, a convolution's
bias add inside ``aten::conv2d``), else in "other".

    python3 Testing/benchmarks/profile_model.py                                  # the H200
    .venv/bin/python Testing/benchmarks/profile_model.py --device cpu --slices 4  # a quick check
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark import brain_slices, model_alone_2d, read_volume, sync  # noqa: E402

from KANTumorSegLib import kan_triton  # noqa: E402
from KANTumorSegLib.kan_layers import FastKANConv2d  # noqa: E402
from KANTumorSegLib.unet import KANUNet2D, ModelConfig  # noqa: E402
from KANTumorSegLib.weights import default_model_path, load_model  # noqa: E402

EXPANSION_RANGE = "kan_expansion"

# (category, substrings of the kernel's own name, substrings of its launching operators' names),
# tried in order, lower case: the first row either of whose lists matches wins. The expansion
# comes first, so its copies count as its own; cuDNN's layout conversions and batch norms
# run inside convolution and batch-norm operators, so their names come before the convolution's.
CATEGORIES = (
    ("expansion (exp/silu/sub/addcmul, Triton)", ("gaussian_expansion", "exp_kernel", "silu", "addcmul"), (EXPANSION_RANGE,)),
    ("copies/layout conversions", ("nchwtonhwc", "nhwctonchw", "memcpy", "memset", "transpose"), ()),
    ("batchnorm", ("batch_norm", "batchnorm", "bn_fw"), ("batch_norm",)),
    ("convolution", ("conv", "xmma", "gemm", "cutlass", "winograd", "fprop"), ("aten::conv2d", "aten::convolution")),
    ("relu", ("relu", "clamp_min", "threshold"), ("aten::relu",)),
    ("pooling/upsample/cat", ("pool", "upsample", "interp", "cat"), ("pool", "upsample", "interpolate", "aten::cat")),
    ("copies/layout conversions", ("copy", "clone", "contiguous"), ("aten::copy_", "aten::to", "aten::contiguous", "aten::clone")),
)
OTHER = "other"


def categorise(kernel: str, operators: list[str]) -> str:
    """The category of a kernel from its name, else from its launching operator and that one's parents."""
    kernel, operators = kernel.lower(), [o.lower() for o in operators]
    for category, names, launchers in CATEGORIES:
        if any(s in kernel for s in names) or any(s in o for s in launchers for o in operators):
            return category
    return OTHER


def operator_stack(event) -> list[str]:
    """An operator's name and those of the operators it runs inside, innermost first."""
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    return names


def device_times(prof, on_cuda: bool) -> list[tuple[str, list[str], float]]:
    """(kernel name, launching operator stack, microseconds) for every kernel of the profile.

    On CUDA: every device event, linked to the operator that launched it through the
    profiler's correlation id (where this torch records one; else placed by its name alone).
    On the CPU: every aten operator's self time (the CPU is the device).
    """
    from torch.autograd import DeviceType

    events = list(prof.events())
    if not on_cuda:
        return [(e.name, operator_stack(e), e.self_cpu_time_total) for e in events
                if e.device_type == DeviceType.CPU and e.name.startswith("aten::")]
    # Operators and profiler ranges only: the CUDA runtime's CPU events number themselves apart.
    operators = {e.id: e for e in events if e.device_type == DeviceType.CPU and not getattr(e, "linked_correlation_id", 0)}
    out = []
    for e in events:
        # Profiler ranges are drawn on the GPU's timeline too: they are spans, not kernels.
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False) and e.name != EXPANSION_RANGE:
            launcher = operators.get(getattr(e, "linked_correlation_id", 0))
            out.append((e.name, operator_stack(launcher), e.time_range.end - e.time_range.start))
    return out


@contextlib.contextmanager
def expansion_marked():
    """Run every FastKANConv2d.expand inside a profiler range, so its kernels can be told apart."""
    expand = FastKANConv2d.expand

    def marked(self, x):
        with torch.profiler.record_function(EXPANSION_RANGE):
            return expand(self, x)

    FastKANConv2d.expand = marked
    try:
        yield
    finally:
        FastKANConv2d.expand = expand


def profile(run, device: torch.device, iterations: int) -> list[tuple[str, list[str], float]]:
    from torch.profiler import ProfilerActivity

    run()  # warm-up: cuDNN's choice of algorithms, Triton's compilation, the allocator
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with expansion_marked(), torch.profiler.profile(activities=activities) as prof:
        for _ in range(iterations):
            run()
        sync(device)
    return device_times(prof, device.type == "cuda")


def print_table(title: str, kernels: list[tuple[str, list[str], float]], iterations: int) -> None:
    by_category: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    for name, stack, microseconds in kernels:
        by_category[categorise(name, stack)] += microseconds
        by_name[name] += microseconds
    total = sum(by_category.values()) or 1.0
    print(f"\n## {title}: {total / iterations / 1e3:.2f} ms per batch of device time\n")
    print("| category | ms per batch | % |\n|---|---|---|")
    for category in dict.fromkeys([c for c, _, _ in CATEGORIES] + [OTHER]):
        print(f"| {category} | {by_category[category] / iterations / 1e3:.3f} | {100 * by_category[category] / total:.1f} |")
    print("\n| top kernels | ms per batch | % |\n|---|---|---|")
    for name, microseconds in sorted(by_name.items(), key=lambda item: -item[1])[:10]:
        short = name.removeprefix("void ").replace("at::native::", "").replace("(anonymous namespace)::", "")
        short = short if len(short) <= 100 else short[:97] + "..."
        print(f"| `{short.replace('|', '/')}` | {microseconds / iterations / 1e3:.3f} | {100 * microseconds / total:.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--slices", type=int, default=64, help="the batch: this many brain crops in one forward pass")
    parser.add_argument("--iterations", type=int, default=None, help="profiled forward passes (default: 5 on CUDA, 1 on the CPU)")
    parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16"), help="bfloat16: under autocast")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    iterations = args.iterations or (5 if device.type == "cuda" else 1)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, card, config = load_model(default_model_path())
    inputs, _ = brain_slices(read_volume("BraTS20_Training_001")[0], config)
    inputs = inputs[:args.slices]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    # Only on CUDA: available() launches a probe kernel, and the layer never uses Triton on the CPU.
    triton_runs = device.type == "cuda" and kan_triton.available()
    print(f"# {name}, torch {torch.__version__}, {args.precision}, batch of {len(inputs)} slices of 224 x 224, "
          f"{iterations} profiled forward passes; Triton expansion available: {triton_runs}")

    plain = KANUNet2D(ModelConfig(base_width=card["model"]["base_width"], conv="plain", head=card["model"]["head"])).eval()
    shipped = f"shipped KANU-Net (width {card['model']['base_width']}, {card['model']['num_grids']} grids)"
    runs = [(f"{shipped}, eager expansion (KANTUMORSEG_TRITON=0)", model, "0")]
    if triton_runs:
        runs.insert(0, (f"{shipped}, Triton expansion (KANTUMORSEG_TRITON=1)", model, "1"))
    runs.append(("plain Conv2d U-Net, same topology (random weights)", plain, "0"))
    before = os.environ.get("KANTUMORSEG_TRITON")
    try:
        for title, network, triton_flag in runs:
            os.environ["KANTUMORSEG_TRITON"] = triton_flag  # read by FastKANConv2d.expand at every call
            run, _ = model_alone_2d(network, inputs, device, len(inputs), precision=args.precision)
            print_table(title, profile(run, device, iterations), iterations)
    finally:
        if before is None:
            os.environ.pop("KANTUMORSEG_TRITON", None)
        else:
            os.environ["KANTUMORSEG_TRITON"] = before
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
