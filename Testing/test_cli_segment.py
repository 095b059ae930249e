"""The command end to end, in real subprocesses, on a real 3D case and on the phantom.

Cases are cut to 8 axial slices and models have random weights and base width 4, so each
run takes seconds on 2 CPU cores; they check the command's behaviour, not accuracy.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import processes
import pytest
import SimpleITK as sitk

from KANTumorSegLib import __version__
from KANTumorSegLib.progress import parse_progress_line

PYTHON = sys.executable
KANTUMORSEG = Path(sys.executable).parent / "kantumorseg"
OUTPUTS = ("crop_seg.nii.gz", "crop.seg.nrrd", "crop_volumes.json", "crop_volumes.csv", "crop_overview.png")


def run(*args: str | Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return processes.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def test_segment_with_jsonl_progress(small_case: Path, tiny_model: Path, tmp_path: Path):
    out = tmp_path / "out"
    done = run(PYTHON, "-m", "KANTumorSegLib", "segment", small_case, "-o", out, "--model", tiny_model,
               "--progress", "jsonl", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    steps = [parse_progress_line(line) for line in lines[:-1]]
    assert all(step is not None for step in steps), lines
    stages = [stage for stage, _, _ in steps]
    assert stages[0] == "read" and {"preprocess", "segment", "write"} <= set(stages)
    for stage in ("preprocess", "segment", "write"):
        last = [s for s in steps if s[0] == stage][-1]
        assert last[1] == last[2] > 0, last
    final = json.loads(lines[-1])
    assert final["stage"] == "done" and final["case"] == "crop" and final["device"] == "cpu"
    assert sorted(Path(p).name for p in final["files"].values()) == sorted(OUTPUTS)
    assert all(Path(p).is_file() and Path(p).parent == out for p in final["files"].values())
    # Nothing else is left in the output folder (no staging folder).
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)


def test_console_script_finds_brats_2023_names(small_case: Path, mixed_model: Path, tmp_path: Path):
    case = tmp_path / "BraTS-GLI-00001-000"
    case.mkdir()
    for old, new in (("t1", "t1n"), ("t1ce", "t1c"), ("t2", "t2w"), ("flair", "t2f")):
        (case / f"BraTS-GLI-00001-000-{new}.nii.gz").symlink_to(small_case / f"crop_{old}.nii.gz")
    out = tmp_path / "out"
    done = run(KANTUMORSEG, "segment", case, "-o", out, "--model", mixed_model, "--labels", "brats2023",
               "--progress", "none", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "Segmented BraTS-GLI-00001-000 on cpu" in done.stdout
    for region in ("NCR", "ED", "ET", "WT", "TC"):
        assert f"  {region} " in done.stdout
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "BraTS-GLI-00001-000_seg.nii.gz")))
    assert set(np.unique(labels).tolist()) == {0, 1, 2, 3}
    inputs = json.loads((out / "BraTS-GLI-00001-000_volumes.json").read_text())["inputs"]
    assert Path(inputs["t1ce"]).name == "BraTS-GLI-00001-000-t1c.nii.gz"
    assert Path(inputs["flair"]).name == "BraTS-GLI-00001-000-t2f.nii.gz"


def test_info_prints_version_device_and_model_card(tiny_model: Path):
    done = run(KANTUMORSEG, "info", "--model", tiny_model)
    assert done.returncode == 0, done.stderr
    assert f"kantumorseg {__version__}" in done.stdout
    assert "device (auto): " in done.stdout
    assert '"name": "tiny-random"' in done.stdout and '"base_width": 4' in done.stdout


def test_phantom_is_written_and_segmented(tiny_model: Path, tmp_path: Path):
    case = tmp_path / "phantom"
    made = run(PYTHON, "-m", "KANTumorSegLib.phantom", case, "--size", "96", "112", "8")
    assert made.returncode == 0, made.stderr
    names = sorted(p.name for p in case.iterdir())
    assert names == sorted(f"phantom_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg"))

    # The simulated tumour has the BraTS labels and its contrasts: ring enhancement on
    # T1ce, oedema bright on FLAIR.
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "phantom_seg.nii.gz")))
    assert {1, 2, 4} <= set(np.unique(seg).tolist())
    t1ce = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "phantom_t1ce.nii.gz")))
    flair = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "phantom_flair.nii.gz")))
    healthy = (t1ce > 0) & (seg == 0)
    assert t1ce[seg == 4].mean() > 1.5 * t1ce[healthy].mean()
    assert flair[seg == 2].mean() > 1.5 * flair[healthy].mean()
    assert not (seg > 0)[t1ce == 0].any()

    out = tmp_path / "out"
    done = run(PYTHON, "-m", "KANTumorSegLib", "segment", case, "-o", out, "--model", tiny_model,
               "--progress", "none", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    labels = sitk.ReadImage(str(out / "phantom_seg.nii.gz"))
    reference = sitk.ReadImage(str(case / "phantom_t1ce.nii.gz"))
    assert labels.GetSize() == reference.GetSize() and labels.GetOrigin() == pytest.approx(reference.GetOrigin())


def test_make_demo_segments_a_given_case(small_case: Path, tiny_model: Path, tmp_path: Path):
    """``make demo CASE=... OUT=...`` with the installed environment (``-o`` keeps make from
    reinstalling it) and the model taken from $KANTUMORSEG_MODEL."""
    import os
    import shutil

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = Path(sys.executable).parent.parent
    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "demo"
    done = processes.run(["make", "-s", "-C", str(repo), "-o", f"{venv}/.installed", "demo", f"VENV={venv}",
                           f"CASE={small_case}", f"OUT={out}"], capture_output=True, text=True, timeout=240,
                         env={**os.environ, "KANTUMORSEG_MODEL": str(tiny_model)})
    assert done.returncode == 0, done.stderr
    assert "Segmented crop on" in done.stdout and "Volumes (mL)" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)


def test_case_name_with_a_folder_is_refused(small_case: Path, tiny_model: Path, tmp_path: Path):
    out = tmp_path / "out"
    done = run(PYTHON, "-m", "KANTumorSegLib", "segment", small_case, "-o", out, "--model", tiny_model,
               "--case-name", "../escape", "--device", "cpu")
    assert done.returncode == 2
    assert "--case-name '../escape' must be a plain file name prefix" in done.stderr
    assert not list(tmp_path.glob("escape*")) and not (out.exists() and any(out.iterdir()))
