"""Training readers against the real shared files, the slice cache, and patient-disjoint splits."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest

from KANTumorSegLib.preprocessing import PreprocessingConfig
from Training.data import (
    CASE_FOLDERS,
    HDF5_FOLDER,
    QUANTUM,
    TEST_CASES,
    TRAIN_CASES,
    SliceSet,
    build_case_set,
    case_volume,
    find_case_files,
    load_hdf5,
    make_split,
    pick_patients,
    read_hdf5_slice,
    read_nifti_case,
)


@pytest.fixture(scope="module")
def hdf5_index(brats_samples: Path) -> list[dict]:
    with open(brats_samples / HDF5_FOLDER / "index.csv", newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="module")
def slice_cache(tmp_path_factory) -> Path:
    """One slice cache for the module: the HDF5 set is preprocessed once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def hdf5_set(brats_samples: Path, slice_cache: Path) -> SliceSet:
    return load_hdf5(brats_samples, slice_cache, PreprocessingConfig())


def test_hdf5_reader_channel_order_and_labels(brats_samples: Path, hdf5_index: list[dict]):
    import h5py

    for row in hdf5_index[:5]:
        path = brats_samples / HDF5_FOLDER / "Test_Samples" / row["file"]
        image, labels = read_hdf5_slice(path)
        with h5py.File(path, "r") as handle:
            raw = np.asarray(handle["image"])
        # The file holds [FLAIR, T1, T1ce, T2]; the model wants [T1, T1ce, T2, FLAIR].
        for model_channel, file_channel in enumerate((1, 2, 3, 0)):
            np.testing.assert_allclose(image[model_channel], raw[..., file_channel], rtol=1e-6)
        # index.csv counts each class's pixels independently of this code.
        assert (labels == 1).sum() == int(row["px_NCR_NET(label1)"])
        assert (labels == 2).sum() == int(row["px_ED(label2)"])
        assert (labels == 4).sum() == int(row["px_ET(label4)"])


def test_nifti_reader_on_real_case(brats_samples: Path):
    import nibabel as nib

    folder = brats_samples / CASE_FOLDERS["Brats18_2013_2_1"]
    volume, seg = read_nifti_case(folder)
    assert volume.shape == (4, 240, 240, 155)
    t1ce = np.asarray(nib.load(str(folder / "Brats18_2013_2_1_t1ce.nii.gz")).dataobj, dtype=np.float32)
    np.testing.assert_array_equal(volume[1], t1ce)
    assert set(np.unique(seg)) <= {0, 1, 2, 4}
    assert int(seg.any(axis=(0, 1)).sum()) == 58   # the samples' README: 58 tumour slices


def test_brats2023_names_are_found(brats_samples: Path, tmp_path: Path):
    source = brats_samples / CASE_FOLDERS["BraTS20_Training_001"]
    for old, new in (("t1", "t1n"), ("t1ce", "t1c"), ("t2", "t2w"), ("flair", "t2f"), ("seg", "seg")):
        (tmp_path / f"case-{new}.nii.gz").symlink_to(source / f"BraTS20_Training_001_{old}.nii.gz")
    files, is_2023 = find_case_files(tmp_path)
    assert is_2023 and files["t1ce"].name == "case-t1c.nii.gz"
    with pytest.raises(FileNotFoundError, match="no complete BraTS case"):
        find_case_files(tmp_path / "..")


def test_case_slices_cover_tumour_and_tumour_free_brain(brats_samples: Path, tmp_path: Path):
    case = build_case_set(brats_samples / CASE_FOLDERS["Brats18_2013_2_1"], "Brats18_2013_2_1", PreprocessingConfig())
    assert case.has_tumour.sum() == 58 and (~case.has_tumour).sum() > 0
    assert case.inputs.shape[1:] == (4, 224, 224) and case.inputs.dtype == np.float16
    case.subset([0, 5]).save(tmp_path / "c.npy.xz")
    back = SliceSet.load(tmp_path / "c.npy.xz")
    np.testing.assert_allclose(back.inputs.astype(np.float32), case.inputs[[0, 5]].astype(np.float32),
                               atol=QUANTUM / 2 + 2 ** -10)  # 8-bit cache (see the quantisation test below)
    assert list(back.patients) == ["Brats18_2013_2_1"] * 2
    np.testing.assert_array_equal(back.z, case.z[[0, 5]])
    np.testing.assert_array_equal(back.corners, case.corners[[0, 5]])


@pytest.mark.parametrize("seed", range(4))
def test_split_has_no_patient_on_two_sides(hdf5_set: SliceSet, seed: int):
    extra = SliceSet(np.zeros((58, 1, 1, 1), np.float16), np.ones((58, 1, 1), np.uint8),
                     np.array(["Brats18_2013_2_1"] * 58), np.array(["nifti"] * 58), np.arange(58),
                     np.zeros((58, 2), np.int16))
    for n in (50, 100, 150):
        split = make_split(hdf5_set, extra, n, 50, seed)
        val = {k[1] for k in split["val"]}
        train = {k[1] for k in split["train"]}
        assert not val & train
        assert split["n_val"] == 50 and split["n_train"] == n
        assert not (val | train) & set(TEST_CASES)
        assert len({tuple(k) for k in split["train"]}) == n   # no slice twice
    # Nested: a seed's n=50 set is inside its n=100 set, so the curves differ only by n.
    small = {tuple(k) for k in make_split(hdf5_set, extra, 50, 50, seed)["train"]}
    large = {tuple(k) for k in make_split(hdf5_set, extra, 100, 50, seed)["train"]}
    assert small <= large


def test_pick_patients_keeps_patients_whole(hdf5_set: SliceSet):
    chosen = pick_patients(hdf5_set.patients, 50, random.Random(1))
    assert int(np.isin(hdf5_set.patients, sorted(chosen)).sum()) == 50


@pytest.mark.parametrize("pool", ["grid", "all"])  # the grid's splits; the shipped model's (shipped.yaml)
def test_split_seed_fixes_the_validation_patients_across_run_seeds(brats_samples: Path, slice_cache: Path, pool: str):
    from Training.config import DEFAULTS, merge
    from Training.train import load_datasets

    def split(seed: int, split_seed: int | None) -> dict:
        cases = [] if pool == "grid" else ["Brats18_2013_2_1"]
        config = merge(DEFAULTS, {"seed": seed, "data": {"root": str(brats_samples), "cache": str(slice_cache),
                                                          "train_cases": cases, "pool": pool, "split_seed": split_seed}})
        return load_datasets(config, None)[2]

    assert split(1, 0)["val"] == split(0, None)["val"] and split(1, 0)["train"] == split(0, None)["train"]
    assert split(1, None)["val"] != split(0, None)["val"]


@pytest.mark.parametrize("case", sorted(CASE_FOLDERS))
def test_every_shared_3d_case_reads_as_brats(brats_samples: Path, case: str):
    """The 15 cases of the shared README, section A: four 240 x 240 x 155 modalities, labels 0/1/2/4."""
    volume, seg = read_nifti_case(brats_samples / CASE_FOLDERS[case])
    assert volume.shape == (4, 240, 240, 155) and seg.shape == (240, 240, 155)
    assert set(np.unique(seg)) <= {0, 1, 2, 4} and (seg > 0).any()


def test_test_and_training_cases_are_disjoint_and_cover_what_users_bring():
    assert not set(TEST_CASES) & set(TRAIN_CASES)
    assert set(TEST_CASES) | set(TRAIN_CASES) == set(CASE_FOLDERS)
    new = {c for c in TEST_CASES if c not in ("BraTS20_Training_001", "BraTS2021_00000")}
    assert len(new) >= 5
    assert "BraTS2021_01480" in new  # no enhancing tumour (shared README)


def test_patient_disjoint_split_over_both_pools(brats_samples: Path, tmp_path: Path):
    """The shipped recipe's split: validation patients from the HDF5 pool and 3D cases, none of
    them training, no test case anywhere; val_in_train (the final run) trains on every one."""
    from Training.config import DEFAULTS, merge
    from Training.train import load_datasets

    data = {"root": str(brats_samples), "cache": str(tmp_path), "pool": "all", "n_val": 25, "split_seed": 0,
            "train_cases": ["Brats18_2013_2_1", "BraTS2021_01484"], "val_cases": ["BraTS2021_01484"]}
    train, val, split = load_datasets(merge(DEFAULTS, {"data": data}), None)
    assert not set(train.patients) & set(val.patients)
    assert "BraTS2021_01484" in set(val.patients) and "Brats18_2013_2_1" in set(train.patients)
    assert {"hdf5", "nifti"} <= set(val.sources) and not (set(train.patients) | set(val.patients)) & set(TEST_CASES)
    assert (~val.has_tumour).any()  # tumour-free brain slices of the 3D case validate too
    final, _, _ = load_datasets(merge(DEFAULTS, {"data": {**data, "val_in_train": True}}), None)
    assert set(val.patients) <= set(final.patients)
    with pytest.raises(ValueError, match="test cases"):
        load_datasets(merge(DEFAULTS, {"data": {**data, "val_cases": ["BraTS2021_01480"]}}), None)


def test_cached_case_matches_the_library_within_the_quantisation_step(brats_samples: Path, tmp_path: Path):
    """The 8-bit LZMA cache the GPU trains on: inputs within half a step of the library's
    preprocessing, and the cached labels pasted back give the expert volume voxel for voxel."""
    case = "BraTS2021_01480"
    built = build_case_set(brats_samples / CASE_FOLDERS[case], case, PreprocessingConfig())
    built.save(tmp_path / "case.npy.xz")
    loaded = SliceSet.load(tmp_path / "case.npy.xz")
    error = np.abs(loaded.inputs.astype(np.float32) - built.inputs.astype(np.float32))
    # float16 rounding of the cached value adds at most 2**-11 near 1.
    assert error.max() <= QUANTUM / 2 + 2 ** -10
    assert (loaded.inputs[built.inputs == -1] == -1).all()
    _, seg = read_nifti_case(brats_samples / CASE_FOLDERS[case])
    assert np.array_equal(case_volume(loaded), seg)


def test_a_3d_case_and_its_own_hdf5_slices_fall_on_one_side(brats_samples: Path, slice_cache: Path):
    """BraTS2021_01477 is HDF5 patient BraTS20_Training_272 (shared README): validating on the
    volume takes its HDF5 slice out of training; training on it keeps that slice out of the
    drawn HDF5 validation patients, whatever the seed; use_hdf5 false trains on the 3D cases alone."""
    from Training.config import DEFAULTS, merge
    from Training.train import load_datasets

    data = {"root": str(brats_samples), "cache": str(slice_cache), "pool": "all", "n_val": 0,
            "train_cases": ["BraTS2021_01477", "Brats18_2013_2_1"], "val_cases": ["BraTS2021_01477"]}
    train, val, _ = load_datasets(merge(DEFAULTS, {"data": data}), None)
    assert {"BraTS2021_01477", "BraTS20_Training_272"} <= set(val.patients)
    assert not {"BraTS2021_01477", "BraTS20_Training_272"} & set(train.patients)
    for seed in range(6):
        _, val, _ = load_datasets(merge(DEFAULTS, {"data": {**data, "val_cases": [], "n_val": 60, "split_seed": seed}}), None)
        assert "BraTS20_Training_272" not in set(val.patients)
    train, _, split = load_datasets(merge(DEFAULTS, {"data": {**data, "use_hdf5": False}}), None)
    assert set(train.sources) == {"nifti"} and set(train.patients) == {"Brats18_2013_2_1"}
    assert split["n_train_patients"] == 1
    with pytest.raises(ValueError, match="not in data.train_cases"):
        load_datasets(merge(DEFAULTS, {"data": {**data, "val_cases": ["BraTS2021_00005"]}}), None)


@pytest.mark.parametrize("intensity_range", ["slice", "volume"])
def test_cached_case_is_the_library_input_of_its_scaling(brats_samples: Path, intensity_range: str):
    """What a 3D case trains on is what ``segment_volume`` feeds the network for that card: with
    "volume" scaling, every slice scaled by the whole case's ranges."""
    from KANTumorSegLib.preprocessing import intensity_ranges, preprocess_slice

    config = PreprocessingConfig(intensity_range=intensity_range)
    case = "BraTS2021_01477"
    built = build_case_set(brats_samples / CASE_FOLDERS[case], case, config)
    volume, _ = read_nifti_case(brats_samples / CASE_FOLDERS[case])
    ranges = intensity_ranges(volume, config) if intensity_range == "volume" else None
    for i in (0, len(built) // 2, len(built) - 1):
        expected = preprocess_slice(volume[..., int(built.z[i])], config, ranges)[0]
        np.testing.assert_allclose(built.inputs[i].astype(np.float32), expected, atol=2 ** -10)
