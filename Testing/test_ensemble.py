"""Ensemble members of ``--confidence`` (issue 19): a float16 member with its own preprocessing
loads into the float32 network and runs on a real case; the command averages it into the map
without touching the labels, and refuses a card whose member file is missing."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import processes
import pytest
import SimpleITK as sitk

from KANTumorSegLib import ensemble
from KANTumorSegLib.weights import load_model, update_card


@pytest.fixture(scope="module")
def model_with_member(mixed_model: Path, tmp_path_factory) -> Path:
    """A copy of the test network (``mixed_model``, "slice" scaling) whose card names a member:
    another random network stored in float16 with "volume" scaling."""
    import torch

    from KANTumorSegLib.preprocessing import PreprocessingConfig
    from KANTumorSegLib.unet import KANUNet2D, ModelConfig
    from KANTumorSegLib.weights import save_model

    folder = tmp_path_factory.mktemp("ensemble")
    for suffix in (".safetensors", ".json"):
        shutil.copy(mixed_model.with_suffix(suffix), folder / f"main{suffix}")
    torch.manual_seed(1)
    save_model(KANUNet2D(ModelConfig(base_width=4)), folder / "member1.safetensors",
               {"name": "member-random", "preprocessing": PreprocessingConfig(intensity_range="volume").to_dict(),
                "labels": "brats2020", "training": "none: random weights for tests"}, half=True)
    update_card(folder / "main.safetensors", {ensemble.CARD_KEY: ["member1.safetensors"]})
    return folder / "main.safetensors"


def test_a_float16_member_loads_into_the_float32_network(model_with_member: Path):
    import torch
    from safetensors import safe_open

    member = model_with_member.parent / "member1.safetensors"
    with safe_open(str(member), "pt") as stored:
        assert {t.dtype for t in map(stored.get_tensor, stored.keys()) if t.is_floating_point()} == {torch.float16}
    model, card, preprocessing = load_model(member)
    assert card["weights_dtype"] == "float16" and preprocessing.intensity_range == "volume"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert ensemble.member_paths(model_with_member, load_model(model_with_member)[1]) == [member]


def test_a_member_doubts_background_where_it_sees_tumour(model_with_member: Path, small_case: Path):
    import torch

    from KANTumorSegLib.case_files import find_modalities
    from KANTumorSegLib.inference import SlicePredictor, segment_volume
    from KANTumorSegLib.volumes import load_case

    volume, _ = load_case(find_modalities(small_case, {}))
    member = model_with_member.parent / "member1.safetensors"
    background = np.zeros(volume.shape[1:], dtype=np.uint8)
    doubt = ensemble.member_doubt(member, volume, background, torch.device("cpu"), 16, "float32")
    assert doubt.shape == background.shape and doubt.dtype == np.float32
    assert 0 <= doubt.min() and doubt.max() <= 1
    # Its doubt in "background" is its P(WT): above one half exactly where the member alone, with
    # its own preprocessing, writes tumour (float16 maps may flip a voxel or so at the threshold).
    model, _, preprocessing = load_model(member)
    own = segment_volume(volume, SlicePredictor(model, torch.device("cpu")), preprocessing)
    assert 0 < (own > 0).mean() < 1
    assert np.mean((doubt > 0.5) != (own > 0)) < 1e-3


def test_the_command_averages_members_into_the_map_and_keeps_the_labels(model_with_member: Path, mixed_model: Path,
                                                                      small_case: Path, tmp_path: Path):
    def segment(model: Path, out: Path):
        done = processes.run([sys.executable, "-m", "KANTumorSegLib", "segment", str(small_case), "-o", str(out),
                              "--device", "cpu", "--progress", "none", "--model", str(model), "--confidence"],
                             capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return (sitk.GetArrayFromImage(sitk.ReadImage(str(out / "crop_seg.nii.gz"))),
                sitk.GetArrayFromImage(sitk.ReadImage(str(out / "crop_confidence.nii.gz"))),
                json.loads((out / "crop_volumes.json").read_text()))

    alone_labels, alone_map, alone = segment(mixed_model, tmp_path / "alone")
    labels, confidence, volumes = segment(model_with_member, tmp_path / "ensemble")
    assert np.array_equal(labels, alone_labels)
    assert volumes["confidence"]["members"] == {"files": ["member1.safetensors"], "passes": 1}
    assert "members" not in alone["confidence"]
    assert not np.array_equal(confidence, alone_map) and confidence.max() <= 100


def test_a_missing_member_stops_the_run(model_with_member: Path, small_case: Path, tmp_path: Path):
    for suffix in (".safetensors", ".json"):
        shutil.copy(model_with_member.with_suffix(suffix), tmp_path / f"lonely{suffix}")
    done = processes.run([sys.executable, "-m", "KANTumorSegLib", "segment", str(small_case), "-o", str(tmp_path / "out"),
                          "--device", "cpu", "--progress", "none", "--model", str(tmp_path / "lonely.safetensors"),
                          "--confidence"], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "member1.safetensors" in done.stderr and "missing" in done.stderr
    assert not (tmp_path / "out").exists()


def test_export_adds_a_float16_member_beside_the_model(tiny_model: Path, mixed_model: Path, tmp_path: Path):
    from Training.export import add_members

    for suffix in (".safetensors", ".json"):
        shutil.copy(tiny_model.with_suffix(suffix), tmp_path / f"main{suffix}")
    card = add_members(tmp_path / "main.safetensors", [mixed_model])
    assert card[ensemble.CARD_KEY] == ["main_member1.safetensors"]
    _, member_card, _ = load_model(tmp_path / "main_member1.safetensors")
    assert member_card["weights_dtype"] == "float16" and member_card["name"] == "mixed-random"
    assert ensemble.member_paths(tmp_path / "main.safetensors", load_model(tmp_path / "main.safetensors")[1]) == [
        tmp_path / "main_member1.safetensors"]


def test_doubt_percent_calibrates_once_and_keeps_the_unpredicted_fill_certain():
    from KANTumorSegLib import confidence as conf
    from KANTumorSegLib.errors import KANTumorSegError

    doubt = np.array([0.0, 0.004, 0.25, 0.5, 1.0], dtype=np.float32)
    assert conf.doubt_percent(doubt, (1.0, 0.0)).tolist() == [0, 0, 25, 50, 100]
    # A calibration that doubts even certain voxels (2 % at raw 1) leaves the never-predicted fill at 0.
    calibrated = conf.doubt_percent(doubt, (0.381, -0.2248))
    assert calibrated[0] == 0 and calibrated[1] >= 1 and list(calibrated[1:]) == sorted(calibrated[1:])
    assert conf.passes_for({}) == conf.DEFAULT_PASSES and conf.passes_for({"confidence_passes": 1}) == 1
    with pytest.raises(KANTumorSegError, match="confidence_passes"):
        conf.passes_for({"confidence_passes": 3})


def test_export_refuses_members_above_the_shipped_size_and_leaves_the_model_as_it_was(
        tiny_model: Path, mixed_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import Training.export as export

    for suffix in (".safetensors", ".json"):
        shutil.copy(tiny_model.with_suffix(suffix), tmp_path / f"main{suffix}")
    before = sorted(p.name for p in tmp_path.iterdir())
    card_before = (tmp_path / "main.json").read_text()
    # The tiny model and its member together are just over this limit.
    monkeypatch.setattr(export, "MAX_BYTES", (tmp_path / "main.safetensors").stat().st_size + 1)
    with pytest.raises(ValueError, match="MiB"):
        export.add_members(tmp_path / "main.safetensors", [mixed_model])
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "main.json").read_text() == card_before
