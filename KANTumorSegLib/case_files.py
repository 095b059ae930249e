"""Finding the four modalities of a case by BraTS file names."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import KANTumorSegError
from .preprocessing import MODALITIES

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

NAME_PATTERNS: dict[str, tuple[str, ...]] = {
    "t1": (r"[_-]t1", r"[_-]t1n"),
    "t1ce": (r"[_-]t1ce", r"[_-]t1c", r"[_-]t1gd"),
    "t2": (r"[_-]t2", r"[_-]t2w"),
    "flair": (r"[_-]flair", r"[_-]t2f"),
}
"""Name endings (before the image suffix) of BraTS 2018-2021 and BraTS 2023 files."""


def name_tokens() -> dict[str, str]:
    """Modality word -> modality, from the BraTS file-name endings (``t1ce`` -> t1ce): for
    names made of words, as Slicer's volume names and DICOM series descriptions are."""
    return {pattern.replace("[_-]", ""): modality
            for modality, patterns in NAME_PATTERNS.items() for pattern in patterns}


def image_stem(path: Path) -> str | None:
    """The file name without its image suffix, or None for a non-image file."""
    name = path.name.lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def modality_of(path: Path) -> str | None:
    """Which modality a BraTS file name denotes, if any."""
    stem = image_stem(path)
    if stem is None:
        return None
    for modality, patterns in NAME_PATTERNS.items():
        if any(re.search(pattern + "$", stem) for pattern in patterns):
            return modality
    return None


def find_modalities(case_dir: Path, explicit: dict[str, Path | None]) -> dict[str, Path]:
    """Map each modality to a file: explicit paths first, then BraTS names in case_dir.

    An explicit entry that is not a path (a DICOM series, from dicom.find_sources) is kept as it is."""
    found: dict[str, list[Path]] = {m: [] for m in MODALITIES}
    if case_dir is not None:
        if not case_dir.exists():
            raise KANTumorSegError(f"Case folder {case_dir} does not exist.")
        if not case_dir.is_dir():
            raise KANTumorSegError(f"Case folder {case_dir} is not a folder.")
        for path in sorted(case_dir.iterdir()):
            modality = modality_of(path)
            if modality is not None and path.is_file():
                found[modality].append(path)
    result: dict[str, Path] = {}
    for modality in MODALITIES:
        given = explicit.get(modality)
        if given is not None:
            result[modality] = given
        elif len(found[modality]) == 1:
            result[modality] = found[modality][0]
        elif len(found[modality]) > 1:
            names = ", ".join(p.name for p in found[modality])
            raise KANTumorSegError(
                f"Several {modality.upper()} files in {case_dir} ({names}); name one with --{modality}.")
        else:
            where = f" in {case_dir}" if case_dir is not None else ""
            raise KANTumorSegError(
                f"No {modality.upper()} image found{where}; expected a name ending in "
                f"{' or '.join(p.strip('[_-]') for p in NAME_PATTERNS[modality])} "
                f"(e.g. case_{modality}.nii.gz), or give it with --{modality}.")
    for modality, path in result.items():
        if not isinstance(path, Path):
            continue
        if not path.exists():
            raise KANTumorSegError(f"The {modality.upper()} file {path} does not exist.")
        if not path.is_file():
            raise KANTumorSegError(f"The {modality.upper()} path {path} is not a file.")
    resolved: dict[Path | str, str] = {}
    for modality, path in result.items():
        key = path.resolve() if isinstance(path, Path) else path.uid
        if key in resolved:
            raise KANTumorSegError(
                f"{resolved[key].upper()} and {modality.upper()} are the same file {path}; each modality needs its own image.")
        resolved[key] = modality
    return result


def case_name(paths: dict[str, Path]) -> str:
    """The case name: the T1ce file's stem without its modality ending (a DICOM series: its folder's name)."""
    if not isinstance(paths["t1ce"], Path):
        return paths["t1ce"].case_name
    stem = image_stem(paths["t1ce"]) or paths["t1ce"].stem
    original = paths["t1ce"].name[: len(stem)]
    for pattern in NAME_PATTERNS["t1ce"]:
        match = re.search(pattern + "$", stem)
        if match:
            return original[: match.start()] or original
    return original
