"""Conformal volume ranges (issue 19): the band's arithmetic on known numbers, and the command
writing a model card's bands into volumes.json and the CSV with their current columns."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import processes
import pytest

from KANTumorSegLib import conformal
from KANTumorSegLib.conformal import ConformalRanges
from KANTumorSegLib.errors import KANTumorSegError
from KANTumorSegLib.weights import load_model, read_card, update_card


def test_the_band_is_the_conformal_order_statistic():
    # ceil((n + 1)(1 - alpha)): 12 patients need the largest residual, 19 the 18th, 4 cannot reach 90 %.
    assert [conformal.conformal_rank(n) for n in (4, 8, 9, 12, 19)] == [5, 9, 9, 12, 18]
    residuals = [0.05 * k for k in range(12, 0, -1)]
    assert conformal.conformal_quantile(residuals) == pytest.approx(0.6)
    assert conformal.conformal_quantile(residuals, alpha=0.25) == pytest.approx(0.5)  # ceil(9.75) = 10th
    assert math.isinf(conformal.conformal_quantile(residuals[:4]))
    with pytest.raises(ValueError, match="too few"):
        ConformalRanges.fit({r: residuals[:4] for r in conformal.REGIONS})


def test_the_residual_and_the_range_are_log_ratios_around_the_volume():
    assert conformal.log_residual(9.5, 4.5, 0.5) == pytest.approx(math.log(2))
    assert conformal.log_residual(4.5, 9.5, 0.5) == pytest.approx(math.log(2))
    # No enhancing tumour written, 0.5 mL by the expert: finite thanks to eps.
    assert conformal.log_residual(0.0, 0.5, 0.5) == pytest.approx(math.log(2))
    assert conformal.interval(9.5, math.log(2), 0.5) == pytest.approx((4.5, 19.5))
    assert conformal.interval(0.0, math.log(2), 0.5) == pytest.approx((0.0, 0.5))  # clipped at 0
    # The range of a residual's own volume reaches the expert volume exactly: the band is tight.
    low, high = conformal.interval(30.0, conformal.log_residual(30.0, 45.0), conformal.EPS_ML)
    assert low < 30.0 and high == pytest.approx(45.0)


def test_nested_classes_take_the_ends_of_their_regions():
    bands = ConformalRanges({"WT": math.log(1.5), "TC": math.log(2), "ET": math.log(2)}, eps_ml=0.5, n_patients=12)
    written = {"WT": 99.5, "TC": 19.5, "ET": 9.5, "NCR": 10.0, "ED": 80.0}
    ranges = bands.ranges(written)
    assert ranges["WT"] == pytest.approx([66.1667, 149.5], abs=1e-4)
    assert ranges["TC"] == pytest.approx([9.5, 39.5]) and ranges["ET"] == pytest.approx([4.5, 19.5])
    assert ranges["NCR"] == pytest.approx([0.0, 35.0])  # [max(0, 9.5 - 19.5), 39.5 - 4.5]
    assert ranges["ED"] == pytest.approx([26.6667, 140.0], abs=1e-4)  # [66.17 - 39.5, 149.5 - 9.5]
    for name, (low, high) in ranges.items():
        assert low <= written[name] <= high, name
    # A band of their own replaces the nested ends.
    own = ConformalRanges({**bands.log_halfwidth, "ED": math.log(1.25)}, eps_ml=0.5).ranges(written)
    assert own["ED"] == pytest.approx([63.9, 100.125])  # 80.5 / 1.25 - 0.5, 80.5 x 1.25 - 0.5
    # The card round trip keeps every band.
    assert ConformalRanges.from_card({"volume_ranges": bands.to_card()}) == bands
    assert ConformalRanges.from_card({}) is None


def test_fitting_gives_the_largest_residual_of_twelve_patients():
    predicted = [10.0 * k for k in range(1, 13)]
    expert = [v * (1.0 + 0.02 * k) for k, v in enumerate(predicted)]
    residuals = {r: [conformal.log_residual(p, e) for p, e in zip(predicted, expert)] for r in conformal.REGIONS}
    fitted = ConformalRanges.fit(residuals, calibration={"patients": 12})
    assert fitted.n_patients == 12 and fitted.log_halfwidth["WT"] == pytest.approx(max(residuals["WT"]))
    # Leave one out: every calibration patient's expert volume inside the range of the other eleven's band
    # except where it holds the largest residual (the 11th of 11 is the band then, so it is inside too).
    for i in range(12):
        rest = {r: v[:i] + v[i + 1:] for r, v in residuals.items()}
        low, high = ConformalRanges.fit(rest).ranges({**dict.fromkeys(("WT", "TC", "ET", "NCR", "ED"), predicted[i])})["WT"]
        assert (low <= round(expert[i], 4) <= high) == (i != 11)


@pytest.fixture(scope="module")
def banded_model(mixed_model: Path, tmp_path_factory) -> Path:
    """A copy of the test network (``mixed_model``) whose card carries conformal bands."""
    folder = tmp_path_factory.mktemp("banded")
    for suffix in (".safetensors", ".json"):
        shutil.copy(mixed_model.with_suffix(suffix), folder / f"banded{suffix}")
    path = folder / "banded.safetensors"
    bands = ConformalRanges({"WT": 0.25, "TC": 0.5, "ET": 0.75}, n_patients=12, calibration={"test": True})
    update_card(path, {"volume_ranges": bands.to_card()})
    return path


def test_a_card_with_bands_writes_conformal_ranges_in_the_usual_columns(banded_model: Path, small_case: Path, tmp_path: Path):
    load_model(banded_model)  # the rewritten card still matches its weights and is valid
    done = processes.run([sys.executable, "-m", "KANTumorSegLib", "segment", str(small_case), "-o", str(tmp_path),
                          "--device", "cpu", "--progress", "none", "--model", str(banded_model), "--confidence"],
                         capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    volumes = json.loads((tmp_path / "crop_volumes.json").read_text())
    bands = ConformalRanges.from_card(read_card(banded_model))
    expected = bands.ranges({r["name"]: r["volume_ml"] for r in volumes["regions"]})
    for region in volumes["regions"]:
        assert region["range_ml"] == expected[region["name"]], region
        assert region["range_ml"][0] <= region["volume_ml"] <= region["range_ml"][1]
    meta = volumes["confidence"]["volume_ranges"]
    assert meta["method"] == "split conformal" and meta["alpha"] == 0.1 and meta["n_patients"] == 12
    assert "9 of 10 patients" in meta["meaning"] and "range_probability_band" not in volumes["confidence"]
    rows = (tmp_path / "crop_volumes.csv").read_text().splitlines()
    assert rows[0] == "region,description,voxels,volume_ml,range_low_ml,range_high_ml"
    wt = next(r for r in volumes["regions"] if r["name"] == "WT")
    assert rows[4].split(",")[4:] == [str(v) for v in wt["range_ml"]]


def test_a_bad_band_is_refused_before_the_slow_part(banded_model: Path, tmp_path: Path):
    for suffix in (".safetensors", ".json"):
        shutil.copy(banded_model.with_suffix(suffix), tmp_path / f"bad{suffix}")
    card = read_card(tmp_path / "bad.safetensors")
    card["volume_ranges"]["log_halfwidth"]["TC"] = -1.0
    (tmp_path / "bad.json").write_text(json.dumps(card))
    with pytest.raises(KANTumorSegError, match="non-negative"):
        load_model(tmp_path / "bad.safetensors")

