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


def _bf16_rows(width: int, et_dice: float) -> list[dict]:
    return [{"width": width, "case": case, "dtype": dtype, "WT": 0.999, "TC": 0.998, "ET": et if dtype == "bfloat16" else 1.0,
             "voxels_differing": 12} for case in ("BraTS20_Training_001", "BraTS2021_00000")
            for dtype, et in (("float32", 1.0), ("bfloat16", et_dice))]


def test_card_records_the_cpu_bf16_check_only_when_every_case_passes(benchmark, tiny_model: Path, tmp_path: Path) -> None:
    """The rows are the accuracy check's output format; the card written is the real one, and
    the library's choice of precision reads it back."""
    import argparse
    import json
    import shutil

    from KANTumorSegLib.inference import choose_precision, native_cpu_bf16
    from KANTumorSegLib.weights import read_card

    weights = tmp_path / "model.safetensors"
    shutil.copy(tiny_model, weights)
    shutil.copy(tiny_model.with_suffix(".json"), weights.with_suffix(".json"))
    args = argparse.Namespace(model=weights)
    before = weights.with_suffix(".json").read_text()
    benchmark.record_cpu_bf16_check(args, _bf16_rows(4, 0.985), torch.device("cpu"))
    assert weights.with_suffix(".json").read_text() == before  # one case under 0.99: card untouched
    benchmark.record_cpu_bf16_check(args, _bf16_rows(4, 0.995), torch.device("cpu"))
    card = read_card(weights)  # still a valid card: the weights' checksum is unchanged
    check = card["inference"]["cpu_bfloat16_check"]
    assert check["cases"]["BraTS2021_00000"] == {"WT": 0.999, "TC": 0.998, "ET": 0.995, "voxels_differing": 12}
    assert list(json.loads(weights.with_suffix(".json").read_text()))[-1] == "sha256"
    assert choose_precision("auto", torch.device("cpu"), card) == ("bfloat16" if native_cpu_bf16() else "float32")
