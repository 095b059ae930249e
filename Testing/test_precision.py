"""--precision: float32 unless this CPU computes bf16 natively and the model's card records a
passed bf16 accuracy check; what ran is written into the volumes JSON."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import processes
import pytest
import torch

from KANTumorSegLib.errors import KANTumorSegError
from KANTumorSegLib.inference import SlicePredictor, choose_precision, native_cpu_bf16
from KANTumorSegLib.unet import KANUNet2D, ModelConfig

CHECKED = {"inference": {"cpu_bfloat16_check": {"BraTS20_Training_001": {"WT": 0.9986, "TC": 0.995, "ET": 0.9958}}}}


def test_auto_follows_the_device_and_the_card():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_precision("auto", cpu, {}) == "float32"
    assert choose_precision("auto", cpu, CHECKED) == ("bfloat16" if native_cpu_bf16() else "float32")
    assert choose_precision("auto", cuda, CHECKED) == "float32"  # bf16 failed the check on the H200
    assert choose_precision("float32", cpu, CHECKED) == "float32"
    assert choose_precision("bfloat16", cpu, {}) == "bfloat16"


def test_bad_precision_is_one_sentence():
    with pytest.raises(KANTumorSegError, match="runs on the CPU or CUDA, not on mps"):
        choose_precision("bfloat16", torch.device("mps"), {})
    with pytest.raises(KANTumorSegError, match="--precision must be one of auto, float32, bfloat16"):
        choose_precision("half", torch.device("cpu"), {})


def test_predictor_runs_the_precision_it_was_given():
    model = KANUNet2D(ModelConfig(base_width=4))
    plain, bf16 = SlicePredictor(model, torch.device("cpu")), SlicePredictor(model, torch.device("cpu"), precision="bfloat16")
    assert (plain.dtype, plain.precision) == (torch.float32, "float32")
    assert (bf16.dtype, bf16.precision) == (torch.bfloat16, "bfloat16")


def _segment(case: Path, model: Path, out: Path, *extra: str) -> dict:
    done = processes.run([sys.executable, "-m", "KANTumorSegLib", "segment", str(case), "-o", str(out), "--model", str(model),
                           "--progress", "none", "--device", "cpu", *extra], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    return json.loads((out / "crop_volumes.json").read_text())["inference"]


def test_command_records_the_precision_auto_chose(small_case: Path, tiny_model: Path, tmp_path: Path):
    assert _segment(small_case, tiny_model, tmp_path / "plain") == {"device": "cpu", "precision": "float32"}
    checked = tmp_path / "checked.safetensors"
    shutil.copy(tiny_model, checked)
    card = json.loads(tiny_model.with_suffix(".json").read_text())
    checked.with_suffix(".json").write_text(json.dumps({**card, **CHECKED}))
    expected = "bfloat16" if native_cpu_bf16() else "float32"
    assert _segment(small_case, checked, tmp_path / "auto")["precision"] == expected
    assert _segment(small_case, checked, tmp_path / "pinned", "--precision", "float32")["precision"] == "float32"
