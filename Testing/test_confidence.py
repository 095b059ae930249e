"""``kantumorseg segment --confidence`` (issue 14): the estimator's parts, and the command and
worker with the shipped model on a real case.

The command runs the shipped weights on the 8 middle slices of BraTS20_Training_001 under all 8
test-time transforms (seconds on 2 CPU cores); how well its confidence finds the wrong voxels is
measured by ``Testing/benchmarks/confidence_eval.py`` (docs/RESULTS.md, "Confidence").
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import processes
import pytest
import SimpleITK as sitk
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from KANTumorSegLib import confidence as conf
from KANTumorSegLib.labels import ED, ET, NCR
from KANTumorSegLib.weights import default_model_path

PYTHON = sys.executable


def run(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return processes.run([PYTHON, "-m", "KANTumorSegLib", *(str(a) for a in args)], capture_output=True, text=True,
                         timeout=timeout)


def test_every_transform_is_undone():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    seen = set()
    for turns, flip in conf.PASSES[8]:
        moved = conf.transform(x, turns, flip)
        seen.add(moved.numpy().tobytes())
        assert torch.equal(conf.untransform(moved, turns, flip), x)
    assert len(seen) == 8, "the 8 passes must be the 8 different symmetries of the square"
    # Every smaller set starts with the identity (the one-pass labels) and is made of the same symmetries.
    assert all(conf.PASSES[n][0] == (0, False) and set(conf.PASSES[n]) <= set(conf.PASSES[8]) for n in conf.PASSES)


def test_label_probability_follows_the_nested_decisions():
    wt, tc, et = 0.9, 0.6, 0.3
    probs = torch.tensor([wt, tc, et]).reshape(1, 3, 1, 1).expand(1, 3, 1, 4)
    labels = torch.tensor([0, ED, NCR, ET], dtype=torch.uint8).reshape(1, 1, 4)
    got = conf.label_probability(probs, labels, "regions").flatten().tolist()
    assert got == pytest.approx([1 - wt, wt * (1 - tc), wt * tc * (1 - et), wt * tc * et])
    # Decoding the same probabilities gives the label with the highest of these for clear cases.
    assert conf.decode(torch.tensor([0.9, 0.8, 0.1]).reshape(1, 3, 1, 1), "regions").item() == NCR


def test_calibration_is_monotone_and_identity_by_default():
    raw = torch.linspace(0.01, 0.999, 50)
    assert torch.equal(conf.calibrate(raw, (1.0, 0.0)), raw)
    scaled = conf.calibrate(raw, (0.4, 0.8))
    assert bool((scaled[1:] > scaled[:-1]).all()) and bool(((scaled > 0) & (scaled < 1)).all())
    assert conf.calibration_for({"sha256": "unknown"}) == (1.0, 0.0)
    assert conf.calibration_for({"sha256": "unknown", "confidence_calibration": [0.5, 1.0]}) == (0.5, 1.0)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), delta=st.sampled_from([0.05, 0.2, 0.4, 0.49]), damage=st.integers(0, 5))
def test_every_range_holds_the_written_volume(seed: int, delta: float, damage: int):
    # Any probabilities, and written labels that need not come from them (post-processing may change some).
    rng = np.random.default_rng(seed)
    regions = torch.from_numpy(rng.random((3, 12, 12), dtype=np.float32))
    labels = conf.decode(regions[None], "regions")[0].numpy()
    flat = labels.reshape(-1)
    flat[rng.choice(flat.size, damage, replace=False)] = rng.choice([0, NCR, ED, ET], damage)
    bits = conf.range_bits(regions, delta).numpy()
    ranges = conf.volume_ranges(bits, labels, 0.001)
    for name, count in (("NCR", (labels == NCR).sum()), ("ED", (labels == ED).sum()), ("ET", (labels == ET).sum()),
                        ("WT", (labels > 0).sum()), ("TC", np.isin(labels, (NCR, ET)).sum())):
        volume = round(int(count) * 0.001, 4)
        assert ranges[name][0] <= volume <= ranges[name][1], (name, ranges[name], volume)


def test_a_wider_band_gives_wider_ranges():
    rng = np.random.default_rng(0)
    regions = torch.from_numpy(rng.random((3, 30, 30), dtype=np.float32))
    labels = conf.decode(regions[None], "regions")[0].numpy()
    narrow = conf.volume_ranges(conf.range_bits(regions, 0.1).numpy(), labels, 1.0)
    wide = conf.volume_ranges(conf.range_bits(regions, 0.4).numpy(), labels, 1.0)
    for region in ("WT", "TC", "ET"):
        assert wide[region][0] <= narrow[region][0] and narrow[region][1] <= wide[region][1]


@pytest.fixture(scope="module")
def shipped_model() -> Path:
    path = default_model_path()
    if not path.is_file():
        pytest.skip(f"the shipped model {path} is not here")
    return path


@pytest.fixture(scope="module")
def both_runs(small_case: Path, shipped_model: Path, tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """The 8-slice case segmented by the shipped model without and with --confidence."""
    out = tmp_path_factory.mktemp("confidence")
    plain = run("segment", small_case, "-o", out / "plain", "--device", "cpu", "--progress", "none", "--model", shipped_model)
    assert plain.returncode == 0, plain.stderr
    done = run("segment", small_case, "-o", out / "confidence", "--device", "cpu", "--progress", "none", "--model",
               shipped_model, "--confidence")
    assert done.returncode == 0, done.stderr
    return out / "plain", out / "confidence", done


def test_the_confidence_map_is_percent_on_the_labelmap_grid(both_runs):
    _, out, _ = both_runs
    labelmap = sitk.ReadImage(str(out / "crop_seg.nii.gz"))
    confidence = sitk.ReadImage(str(out / "crop_confidence.nii.gz"))
    assert confidence.GetPixelID() == sitk.sitkUInt8
    assert confidence.GetSize() == labelmap.GetSize() and confidence.GetSpacing() == labelmap.GetSpacing()
    assert confidence.GetOrigin() == labelmap.GetOrigin() and confidence.GetDirection() == labelmap.GetDirection()
    values = sitk.GetArrayFromImage(confidence)
    labels = sitk.GetArrayFromImage(labelmap)
    assert values.max() <= 100
    # Far from the tumour the model is sure (98-99 % once calibrated); somewhere along the tumour's border it is not.
    assert np.median(values[labels == 0]) >= 95
    assert values[labels > 0].min() < 90


def test_confidence_keeps_the_labels_and_adds_ranges_columns_and_summary(both_runs):
    plain, out, done = both_runs
    same = np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(plain / "crop_seg.nii.gz"))),
                          sitk.GetArrayFromImage(sitk.ReadImage(str(out / "crop_seg.nii.gz"))))
    assert same == (not conf.LABELS_FROM_PASSES)
    assert not (plain / "crop_confidence.nii.gz").exists()
    volumes = json.loads((out / "crop_volumes.json").read_text())
    assert [r["name"] for r in volumes["regions"]] == ["NCR", "ED", "ET", "WT", "TC"]
    for region in volumes["regions"]:
        low, high = region["range_ml"]
        assert low <= region["volume_ml"] <= high, region
    assert volumes["confidence"]["file"] == "crop_confidence.nii.gz" and volumes["confidence"]["passes"] == conf.DEFAULT_PASSES
    assert "range_ml" not in json.loads((plain / "crop_volumes.json").read_text())["regions"][0]
    rows = (out / "crop_volumes.csv").read_text().splitlines()
    assert rows[0] == "region,description,voxels,volume_ml,range_low_ml,range_high_ml"
    wt = next(r for r in volumes["regions"] if r["name"] == "WT")
    assert rows[4].split(",")[4:] == [str(v) for v in wt["range_ml"]]
    assert (plain / "crop_volumes.csv").read_text().splitlines()[0] == "region,description,voxels,volume_ml"
    line = f"WT {wt['volume_ml']:.1f} mL ({wt['range_ml'][0]:.1f}-{wt['range_ml'][1]:.1f})"
    assert re.search(r"^  WT \d+\.\d mL \(\d+\.\d-\d+\.\d\)  ", done.stdout, re.M) and line in done.stdout, done.stdout


def test_a_run_without_confidence_removes_an_old_map_and_existing_maps_are_refused(both_runs, small_case: Path,
                                                                                   shipped_model: Path):
    _, out, _ = both_runs
    refused = run("segment", small_case, "-o", out, "--device", "cpu", "--progress", "none", "--model", shipped_model,
                  "--confidence")
    assert refused.returncode == 2 and refused.stderr.strip().startswith("kantumorseg: error: ")
    assert len(refused.stderr.strip().splitlines()) == 1 and "--overwrite" in refused.stderr
    again = run("segment", small_case, "-o", out, "--device", "cpu", "--progress", "none", "--model", shipped_model,
                "--overwrite")
    assert again.returncode == 0, again.stderr
    # The old map described the labels of an earlier run: it must not outlive them.
    assert not (out / "crop_confidence.nii.gz").exists()
    assert "range_ml" not in json.loads((out / "crop_volumes.json").read_text())["regions"][0]


def test_the_worker_passes_confidence_through(small_case: Path, shipped_model: Path, tmp_path: Path):
    argv = ["segment", str(small_case), "-o", str(tmp_path), "--device", "cpu", "--progress", "jsonl", "--model",
            str(shipped_model), "--confidence"]
    done = processes.run([PYTHON, "-m", "KANTumorSegLib", "worker"], input=json.dumps({"argv": argv}) + "\n",
                         capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == '{"event": "exit", "code": 0}', lines[-3:]
    final = json.loads(next(line for line in lines if line.startswith('{"stage": "done"')))
    assert Path(final["files"]["confidence"]).name == "crop_confidence.nii.gz" and Path(final["files"]["confidence"]).is_file()
    assert final["warnings"] == []
