"""Shared pytest fixtures: the real BraTS samples (skipped where absent) and small models."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLES = Path(os.environ.get("KANTUMORSEG_SAMPLES", REPO.parent / "shared" / "data" / "brats_samples"))
CASE_001 = "HunorLaczko_IPCV-TRDP_BraTS_2020/example/BraTS20_Training_001"


@pytest.fixture(scope="session")
def brats_samples() -> Path:
    """The read-only BraTS sample folder (../shared/data/brats_samples); skips when absent."""
    if not SAMPLES.is_dir():
        pytest.skip(f"real BraTS samples not found at {SAMPLES} (set KANTUMORSEG_SAMPLES to their folder)")
    return SAMPLES


@pytest.fixture(scope="session")
def brats_case_001(brats_samples: Path) -> Path:
    """BraTS20_Training_001: four modalities and the expert segmentation, 240x240x155 LPS."""
    case = brats_samples / CASE_001
    if not case.is_dir():
        pytest.skip(f"{case} not found in the BraTS samples")
    return case


def write_cropped_case(case_001: Path, out: Path) -> Path:
    """Write BraTS20_Training_001 (folder ``case_001``) cut to the 30 axial slices around the
    tumour's centre into ``out``: crop_<modality>.nii.gz (case name "crop"), plus crop_seg.nii.gz
    outside the case folder's modality names (the expert labels, same grid)."""
    import numpy as np
    import SimpleITK as sitk

    seg = sitk.ReadImage(str(case_001 / "BraTS20_Training_001_seg.nii.gz"))
    tumour_z = np.nonzero(sitk.GetArrayViewFromImage(seg).any(axis=(1, 2)))[0]
    centre = int(tumour_z[0] + tumour_z[-1]) // 2
    for name in ("t1", "t1ce", "t2", "flair", "seg"):
        image = seg if name == "seg" else sitk.ReadImage(str(case_001 / f"BraTS20_Training_001_{name}.nii.gz"))
        sitk.WriteImage(image[:, :, centre - 15:centre + 15], str(out / f"crop_{name}.nii.gz"))
    return out


@pytest.fixture(scope="session")
def cropped_case(brats_case_001: Path, tmp_path_factory) -> Path:
    """BraTS20_Training_001 cut to the 30 axial slices around the tumour's centre, for fast runs
    (``write_cropped_case``)."""
    return write_cropped_case(brats_case_001, tmp_path_factory.mktemp("cropped_case"))


def write_tiny_model(path: Path) -> Path:
    """Save a random-weights KANU-Net with base_width 4 (seed 0) and its model card at ``path``."""
    import torch

    from KANTumorSegLib.preprocessing import PreprocessingConfig
    from KANTumorSegLib.unet import KANUNet2D, ModelConfig
    from KANTumorSegLib.weights import save_model

    torch.manual_seed(0)
    save_model(KANUNet2D(ModelConfig(base_width=4)), path,
               {"name": "tiny-random", "preprocessing": PreprocessingConfig().to_dict(), "labels": "brats2020",
                "training": "none: random weights for tests"})
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random-weights KANU-Net with base_width 4 and its model card: fast, not accurate."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model") / "tiny.safetensors")


CASES_3D: dict[str, str] = {
    "BraTS20_Training_001": CASE_001,
    "Brats18_2013_2_1": "IAmSuyogJadhav_Brainy/Brats18_2013_2_1",
    "BraTS2021_00000": "DevNazrin_brats-segmentation-study/example_case",
}
"""The three real 3D cases (section A of the samples' README): case name -> folder."""


@pytest.fixture(scope="session")
def case_paths(brats_samples: Path) -> dict[str, dict[str, Path]]:
    """For each of the three 3D cases: {"t1", "t1ce", "t2", "flair", "seg"} -> its NIfTI file."""
    paths = {case: {m: brats_samples / folder / f"{case}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg")}
             for case, folder in CASES_3D.items()}
    missing = [str(p) for files in paths.values() for p in files.values() if not p.is_file()]
    if missing:
        pytest.skip(f"3D cases missing from the BraTS samples: {', '.join(missing[:2])}")
    return paths


@pytest.fixture(scope="session")
def mixed_model(cropped_case: Path, tmp_path_factory) -> Path:
    """A random-weights KANU-Net (base width 4) whose head bias is centred on real slices, so
    that every class wins somewhere: outputs then hold all labels (a plain random network
    tends to predict one class everywhere). Still random, not a trained model."""
    import numpy as np
    import torch

    from KANTumorSegLib.case_files import find_modalities
    from KANTumorSegLib.preprocessing import PreprocessingConfig, preprocess_slice
    from KANTumorSegLib.unet import KANUNet2D, ModelConfig
    from KANTumorSegLib.volumes import load_case
    from KANTumorSegLib.weights import save_model

    torch.manual_seed(0)
    model = KANUNet2D(ModelConfig(base_width=4)).eval()
    volume, _ = load_case(find_modalities(cropped_case, {}))
    config = PreprocessingConfig()
    inputs = np.stack([preprocess_slice(volume[..., z], config)[0] for z in range(0, volume.shape[3], 8)])
    with torch.no_grad():
        logits = model(torch.from_numpy(inputs))
        model.head.conv.bias -= logits.mean(dim=(0, 2, 3))
    path = tmp_path_factory.mktemp("mixed_model") / "mixed.safetensors"
    save_model(model, path, {"name": "mixed-random", "preprocessing": config.to_dict(), "labels": "brats2020",
                             "training": "none: random weights, head bias centred on real slices, for tests"})
    return path


@pytest.fixture(scope="session")
def small_case(cropped_case: Path, tmp_path_factory) -> Path:
    """The middle 8 slices of the cropped case (names crop_<modality>.nii.gz, physical
    positions kept): for end-to-end runs that must take seconds on 2 CPU cores."""
    import SimpleITK as sitk

    out = tmp_path_factory.mktemp("small_case")
    for name in ("t1", "t1ce", "t2", "flair", "seg"):
        image = sitk.ReadImage(str(cropped_case / f"crop_{name}.nii.gz"))
        sitk.WriteImage(image[:, :, 11:19], str(out / f"crop_{name}.nii.gz"))
    return out


@pytest.fixture
def ends() -> Iterator[Callable[[subprocess.Popen], subprocess.Popen]]:
    """``ends(process)`` returns ``process`` (started in a session of its own, as
    ``slicer_process.launch`` and ``processes.start`` do) and kills its process group when the
    test ends, passed or failed, unless it was reaped before (``processes.end_group``)."""
    from processes import end_group

    started: list[subprocess.Popen] = []

    def register(process: subprocess.Popen) -> subprocess.Popen:
        started.append(process)
        return process

    yield register
    for process in started:
        end_group(process)
