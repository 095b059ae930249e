"""The benchmark's training-throughput row (Testing/benchmarks/benchmark.py), on the CPU.

Its GPU figures feed docs/PERFORMANCE.md: the step it times must be a whole training step
(forward and backward, so its FLOPs are about three forward passes) and must train a copy, since
the benchmark's accuracy check runs the same model afterwards.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", REPO / "Testing" / "benchmarks" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_row_times_forward_and_backward_on_a_copy(benchmark, cropped_case: Path) -> None:
    from KANTumorSegLib.preprocessing import PreprocessingConfig
    from KANTumorSegLib.unet import KANUNet2D, ModelConfig
    from KANTumorSegLib.volumes import load_case

    volume, _ = load_case({m: cropped_case / f"crop_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")})
    inputs, _ = benchmark.brain_slices(volume[..., 14:16], PreprocessingConfig())
    inputs = inputs[..., 80:144, 80:144].copy()  # the crops' centre: the network takes any multiple of 16
    torch.manual_seed(0)
    model = KANUNet2D(ModelConfig(base_width=4, head="regions")).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        forward = benchmark.flops_of(lambda: model(torch.from_numpy(inputs[:1])))

    benchmark.WARMUP = 0  # the figures are not checked here, only what the step does
    row = benchmark.train_throughput(model, inputs, torch.device("cpu"), batch=2, steps=1)

    # Backward costs two forward passes, less the first layer's unneeded input gradient.
    assert 2.5 < row["flops_step"] / (2 * forward) <= 3.0
    assert row["slices_per_s"] == pytest.approx(2 / row["step_s"])
    assert row["dtype"] == "float32" and row["tflops"] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the benchmark's model was trained"
    assert not model.training
