"""Readers, the slice cache and patient-disjoint splits.

Two sources of labelled slices: the Kaggle BraTS2020 HDF5 slices (one file per axial slice)
and BraTS NIfTI case folders (four modalities plus ``seg``). Both are turned into the
library's model input by ``KANTumorSegLib.preprocessing.preprocess_slice``, so training sees
exactly what inference sees. Nothing here imports SimpleITK: the GPU machine lacks it.
"""

from __future__ import annotations

import csv
import json
import lzma
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from KANTumorSegLib.preprocessing import MODALITIES, PreprocessingConfig, crop, preprocess_slice

HDF5_FOLDER = "mwarylak_BraTS_Thesis"
HDF5_CHANNELS = ("flair", "t1", "t1ce", "t2")
"""Channel order of the Kaggle HDF5 ``image`` dataset (its README)."""

NAMES_2020 = {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"}
NAMES_2023 = {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f", "seg": "-seg"}

_INDIGO = "indigoYoshimaru_3d-brain-thesis"
_PATLIAO = "patliao_SYSC4907-Glioma-Growth-Visualization"
CASE_FOLDERS = {
    "Brats18_2013_2_1": "IAmSuyogJadhav_Brainy/Brats18_2013_2_1",
    "BraTS20_Training_001": "HunorLaczko_IPCV-TRDP_BraTS_2020/example/BraTS20_Training_001",
    "BraTS2021_00000": "DevNazrin_brats-segmentation-study/example_case",
    "BraTS19_CBICA_ASK_1": f"{_INDIGO}/BraTS19_CBICA_ASK_1",
    **{f"BraTS2021_{n}": f"{_INDIGO}/BraTS2021_{n}" for n in ("00002", "00003", "00005", "00006", "00019", "00024")},
    **{f"BraTS2021_{n}": f"{_PATLIAO}/BraTS2021_{n}"
       for n in ("01476", "01477", "01478", "01480", "01481", "01482", "01484", "01485")},
    "BraTS-GLI-00012-000": "tahirakram15_brats2023/BraTS-GLI-00012-000",
}
"""The 19 shared 3D cases by id (README of the shared folder, section A)."""

SAME_PATIENT = {"BraTS2021_01477": "BraTS20_Training_272", "BraTS2021_01478": "BraTS20_Training_273",
                "BraTS2021_01481": "BraTS20_Training_276"}
"""3D cases that are HDF5 patients too (shared README, section A): one split group each."""


def patient_group(patient: str) -> str:
    """The split group of a patient id: a 3D case and its own HDF5 slices share one."""
    return SAME_PATIENT.get(patient, patient)

TEST_CASES = ("BraTS20_Training_001", "BraTS2021_00000", "BraTS2021_01480", "BraTS2021_01476", "BraTS2021_00019",
              "BraTS2021_01485", "BraTS19_CBICA_ASK_1")
"""Never trained on, never used to choose a model: the two earlier test patients, a tumour without
enhancing tumour (01480), a lower-grade-looking one with 0.2 mL of enhancing tumour (01476), an
edema-dominated glioma (00019), one with a trace of enhancing tumour (01485) and a 2019 CBICA case."""

TRAIN_CASES = ("Brats18_2013_2_1", "BraTS2021_00002", "BraTS2021_00003", "BraTS2021_00005", "BraTS2021_00006",
               "BraTS2021_00024", "BraTS2021_01482", "BraTS2021_01484", "BraTS2021_01477", "BraTS2021_01478",
               "BraTS2021_01481", "BraTS-GLI-00012-000")
"""Training material: every brain slice of each (validation patients are drawn from these).
01484 (135 mL non-enhancing core) and 01477 have no enhancing tumour, the tumour type the earlier
model turned into edema; 01482 saturates at 32767; 01481 is mostly edema; BraTS-GLI-00012-000
is mostly necrotic/non-enhancing core, in BraTS 2023 names."""


def labels_from_onehot(mask: np.ndarray) -> np.ndarray:
    """(X, Y, 3) one-hot [NCR, ED, ET] -> (X, Y) uint8 labels 0/1/2/4."""
    onehot = mask.astype(bool)
    labels = np.zeros(mask.shape[:2], dtype=np.uint8)
    labels[onehot[..., 0]] = 1
    labels[onehot[..., 1]] = 2
    labels[onehot[..., 2]] = 4
    return labels


def read_hdf5_slice(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One Kaggle HDF5 slice -> ((4, X, Y) float32 in T1, T1ce, T2, FLAIR order, (X, Y) labels)."""
    import h5py

    with h5py.File(path, "r") as handle:
        image = np.asarray(handle["image"], dtype=np.float32)
        mask = np.asarray(handle["mask"])
    order = [HDF5_CHANNELS.index(m) for m in MODALITIES]
    return np.moveaxis(image, -1, 0)[order], labels_from_onehot(mask)


def find_case_files(folder: Path) -> tuple[dict[str, Path], bool]:
    """The four modalities and ``seg`` of a BraTS case folder; True when named as BraTS 2023."""
    for names, is_2023 in ((NAMES_2020, False), (NAMES_2023, True)):
        found = {key: sorted(folder.glob(f"*{suffix}.nii*")) for key, suffix in names.items()}
        if all(len(files) == 1 for files in found.values()):
            return {key: files[0] for key, files in found.items()}, is_2023
    raise FileNotFoundError(f"{folder} holds no complete BraTS case (t1, t1ce, t2, flair and seg NIfTI files).")


def read_nifti_case(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """A BraTS case folder -> ((4, X, Y, Z) float32 volume, (X, Y, Z) uint8 labels 0/1/2/4).

    nibabel's array of a BraTS file is already in the model-grid layout (X to the left,
    Y to posterior), the layout of the HDF5 slices.
    """
    import nibabel as nib

    files, is_2023 = find_case_files(folder)
    volume = np.stack([np.asarray(nib.load(str(files[m])).dataobj, dtype=np.float32) for m in MODALITIES])
    seg = np.asarray(nib.load(str(files["seg"])).dataobj).astype(np.uint8)
    if is_2023:
        seg[seg == 3] = 4
    return volume, seg


def voxel_ml(folder: Path) -> float:
    """Volume of one voxel of a BraTS case folder's segmentation, in mL."""
    import nibabel as nib

    return float(np.prod(nib.load(str(find_case_files(folder)[0]["seg"])).header.get_zooms()[:3])) / 1000.0


@dataclass
class SliceSet:
    """Preprocessed slices: inputs (N, 4, S, S) float16, labels (N, S, S) uint8 0/1/2/4,
    and per slice its patient, source, axial index and crop-box corner (x0, y0), which puts
    a prediction back on the 240 x 240 slice."""

    inputs: np.ndarray
    labels: np.ndarray
    patients: np.ndarray
    sources: np.ndarray
    z: np.ndarray
    corners: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> SliceSet:
        index = np.asarray(index, dtype=int)
        return SliceSet(*(getattr(self, f)[index] for f in FIELDS))

    @property
    def has_tumour(self) -> np.ndarray:
        return self.labels.reshape(len(self), -1).any(axis=1)

    @staticmethod
    def concat(parts: list[SliceSet]) -> SliceSet:
        return SliceSet(*(np.concatenate([getattr(p, f) for p in parts]) for f in FIELDS))

    def save(self, path: Path) -> None:
        """An LZMA-compressed file of the arrays, inputs quantised to 8 bits (``quantise``):
        a BraTS case is about 3.9 MB, so the training and test sets fit a device call."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        with lzma.open(partial, "wb", preset=6) as stream:
            for name in FIELDS:
                value = getattr(self, name)
                value = quantise(value) if name == "inputs" else value
                np.save(stream, value.astype(str) if value.dtype.kind in "OU" else value, allow_pickle=False)
        partial.replace(path)

    @staticmethod
    def load(path: Path) -> SliceSet:
        with lzma.open(path, "rb") as stream:
            arrays = [np.load(stream, allow_pickle=False) for _ in FIELDS]
        arrays[0] = dequantise(arrays[0])
        return SliceSet(*arrays)


FIELDS = ("inputs", "labels", "patients", "sources", "z", "corners")
QUANTUM = 2.0 / 255.0
"""The step of the cached inputs: [-1, 1] in 255 steps; -1 (background) and 1 stay exact."""


def quantise(inputs: np.ndarray) -> np.ndarray:
    """Model inputs in [-1, 1] -> uint8 codes; dequantise is within QUANTUM / 2 of the input."""
    return np.round((inputs.astype(np.float32) + 1.0) / QUANTUM).clip(0, 255).astype(np.uint8)


def dequantise(codes: np.ndarray) -> np.ndarray:
    return (codes.astype(np.float32) * QUANTUM - 1.0).astype(np.float16)


def prepare_slice(image: np.ndarray, labels: np.ndarray, config: PreprocessingConfig, ranges: np.ndarray | None = None):
    """The library's preprocessing of one slice, labels cut by the same crop box; None without brain."""
    prepared = preprocess_slice(image, config, ranges)
    if prepared is None:
        return None
    inputs, box = prepared
    return inputs.astype(np.float16), crop(labels, box, fill=0), (box.x0, box.y0)


def build_hdf5_set(root: Path, config: PreprocessingConfig) -> SliceSet:
    """Every HDF5 slice of the Kaggle set, preprocessed; patients from index.csv."""
    folder = root / HDF5_FOLDER
    with open(folder / "index.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    inputs, labels, patients, z, corners = [], [], [], [], []
    for row in rows:
        image, label = read_hdf5_slice(folder / "Test_Samples" / row["file"])
        x, y, corner = prepare_slice(image, label, config)
        inputs.append(x)
        labels.append(y)
        corners.append(corner)
        patients.append(row["BraTS2020_id"])
        z.append(int(row["axial_slice_z"]))
    return SliceSet(np.stack(inputs), np.stack(labels), np.array(patients), np.array(["hdf5"] * len(rows)), np.array(z),
                    np.array(corners, dtype=np.int16))


def build_case_set(folder: Path, case: str, config: PreprocessingConfig) -> SliceSet:
    """Every brain slice of a NIfTI case (with and without tumour), preprocessed as the
    library's ``segment_volume`` does (with "volume" scaling, by the whole case's ranges)."""
    from KANTumorSegLib.preprocessing import volume_ranges

    volume, seg = read_nifti_case(folder)
    if seg.shape[:2] != CASE_SHAPE:
        raise ValueError(f"{folder}: slices of {seg.shape[:2]}, not the BraTS {CASE_SHAPE}")
    ranges = volume_ranges(volume, config)
    inputs, labels, z, corners = [], [], [], []
    for k in range(volume.shape[-1]):
        prepared = prepare_slice(volume[..., k], seg[..., k], config, ranges)
        if prepared is not None:
            inputs.append(prepared[0])
            labels.append(prepared[1])
            corners.append(prepared[2])
            z.append(k)
        elif seg[..., k].any():
            raise ValueError(f"{folder}: slice {k} holds expert tumour but no brain")
    return SliceSet(np.stack(inputs), np.stack(labels), np.array([case] * len(z)), np.array(["nifti"] * len(z)), np.array(z),
                    np.array(corners, dtype=np.int16))


CASE_SHAPE = (240, 240)
"""In-plane size of every shared BraTS volume (1 mm, 240 x 240 x 155)."""


def case_volume(cases: SliceSet, depth: int = 155) -> np.ndarray:
    """(X, Y, depth) labels of one case's cached slices (or predictions put in their place),
    pasted back through their crop boxes: slices without brain stay 0, as in the library."""
    from KANTumorSegLib.preprocessing import CropBox, paste

    out = np.zeros((*CASE_SHAPE, depth), dtype=np.uint8)
    size = cases.labels.shape[-1]
    for labels, z, (x0, y0) in zip(cases.labels, cases.z, cases.corners):
        out[..., int(z)] = paste(labels, CropBox(int(x0), int(y0), size), CASE_SHAPE)
    return out


def cached(cache: Path, name: str, build) -> SliceSet:
    """Load ``cache/name.npy.xz``, building and saving it first when absent."""
    path = cache / f"{name}.npy.xz"
    if not path.exists():
        build().save(path)
    return SliceSet.load(path)


def cache_name(name: str, config: PreprocessingConfig) -> str:
    """A cache file's name: the study's slice scaling keeps the plain name, "volume" scaling
    (at its percentile) its own, so caches of both live side by side."""
    if config.intensity_range == "slice":
        return name
    return f"{name}_vol{config.upper_percentile:g}"


def load_hdf5(root: Path, cache: Path, config: PreprocessingConfig) -> SliceSet:
    return cached(cache, cache_name("hdf5", config), lambda: build_hdf5_set(root, config))


def load_case(root: Path, cache: Path, case: str, config: PreprocessingConfig) -> SliceSet:
    return cached(cache, cache_name(case, config), lambda: build_case_set(root / CASE_FOLDERS[case], case, config))


def pick_patients(patients: np.ndarray, count: int, rng: random.Random) -> set[str]:
    """Whole patients, in random order, until their slices reach ``count``; patients that
    would overshoot are skipped so the set hits ``count`` exactly when it can."""
    unique = sorted(set(patients.tolist()))
    rng.shuffle(unique)
    sizes = {p: int((patients == p).sum()) for p in unique}
    chosen, total = set(), 0
    for patient in unique:
        if total + sizes[patient] <= count:
            chosen.add(patient)
            total += sizes[patient]
        if total == count:
            break
    return chosen


def make_split(hdf5: SliceSet, extra: SliceSet | None, n_train: int, n_val: int, seed: int) -> dict:
    """Patient-disjoint split: ``n_val`` validation slices of whole HDF5 patients, then
    ``n_train`` training slices, first from the remaining HDF5 patients, then from ``extra``
    (the tumour slices of the training 3D case) when the HDF5 pool runs out.

    Returns {"val": [...], "train": [...]} of (source, patient, z) triples plus the counts.
    """
    rng = random.Random(seed)
    val_patients = pick_patients(hdf5.patients, n_val, rng)
    val = [i for i in range(len(hdf5)) if hdf5.patients[i] in val_patients]
    pool = [("hdf5", i) for i in range(len(hdf5)) if hdf5.patients[i] not in val_patients]
    rng.shuffle(pool)
    if extra is not None:
        extra_pool = [("extra", i) for i in range(len(extra))]
        rng.shuffle(extra_pool)
        pool += extra_pool
    train = pool[:n_train]

    def key(source: str, i: int) -> list:
        s = hdf5 if source == "hdf5" else extra
        return [str(s.sources[i]), str(s.patients[i]), int(s.z[i])]

    return {
        "seed": seed,
        "n_train_requested": n_train,
        "n_train": len(train),
        "n_val": len(val),
        "val": [key("hdf5", i) for i in val],
        "train": [key(s, i) for s, i in train],
    }


def select(split_keys: list, sets: list[SliceSet]) -> SliceSet:
    """The slices named by (source, patient, z) keys, looked up in ``sets``."""
    lookup = {}
    for set_index, s in enumerate(sets):
        for i in range(len(s)):
            lookup[(str(s.sources[i]), str(s.patients[i]), int(s.z[i]))] = (set_index, i)
    parts = []
    for key in split_keys:
        set_index, i = lookup[tuple(key)]
        parts.append(sets[set_index].subset([i]))
    return SliceSet.concat(parts)


def save_split(split: dict, path: Path) -> None:
    path.write_text(json.dumps(split, indent=1) + "\n")


def stage_cache(root: Path, cache: Path, stage: Path | None = None, ranges: tuple[str, ...] = ("slice",),
                part_mb: float = 40.0, test: bool = False) -> str:
    """Build the cache of the HDF5 slices and the training cases for each intensity range in
    ``ranges`` (the library's preprocessing otherwise at its defaults), and with ``stage``
    hard-link it into stage/part1, part2, ... of at most ``part_mb`` each: each part travels in
    one device call beside the repository (64 MiB with the 18 MB tree and the wheels), and the
    call copies it into the cache folder, which stays while the machine is warm. Test cases are
    cached only with ``test``, for grids of many small runs scored on the device (``train.test``,
    the study's Table 1); a shipped candidate's figures come from the library's own inference on
    the CPU (Training/scripts/evaluate_model.py). Returns a one-line summary."""
    import os

    files = []
    for config in (PreprocessingConfig(intensity_range=r) for r in ranges):
        load_hdf5(root, cache, config)
        files.append(cache / f"{cache_name('hdf5', config)}.npy.xz")
        for case in TRAIN_CASES + (TEST_CASES if test else ()):
            load_case(root, cache, case, config)
            files.append(cache / f"{cache_name(case, config)}.npy.xz")
    if stage is None:
        return f"cache ready in {cache}"
    parts: list[list[Path]] = [[]]
    for path in files:
        if parts[-1] and sum(p.stat().st_size for p in parts[-1]) + path.stat().st_size > part_mb * 1e6:
            parts.append([])
        parts[-1].append(path)
    for number, part in enumerate(parts, 1):
        (stage / f"part{number}").mkdir(parents=True, exist_ok=True)
        for path in part:
            target = stage / f"part{number}" / path.name
            target.unlink(missing_ok=True)
            os.link(path, target)
    sizes = ", ".join(f"part{n} {sum(p.stat().st_size for p in part) / 1e6:.0f} MB" for n, part in enumerate(parts, 1))
    return f"cache ready in {cache}, staged in {stage}: {sizes}"
