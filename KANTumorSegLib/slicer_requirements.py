"""The 3D Slicer module's requirements list against the installed package versions, read from
package metadata so that nothing is imported into Slicer's process. Standard library only
(see slicer_command).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path


def version_tuple(version: str) -> tuple[int, ...]:
    """The leading numbers of a version (``2.4.1+cu121`` -> (2, 4, 1))."""
    numbers = []
    for part in re.split(r"[.+-]", version):
        match = re.match(r"\d+", part)
        if not match:
            break
        numbers.append(int(match.group()))
        if match.group() != part:
            break
    return tuple(numbers)


def read_requirements(path: str | Path) -> list[tuple[str, tuple[int, ...], str]]:
    """(distribution, minimum version, requirement line) of each ``name>=X.Y`` line of a
    requirements list (comments and blank lines skipped)."""
    requirements = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)", line)
        if match is None:
            raise ValueError(f"{path}: expected 'name>=version', got {line!r}")
        requirements.append((match.group(1), version_tuple(match.group(2)), line))
    return requirements


def unmet_requirements(requirements: Sequence[tuple[str, tuple[int, ...], str]], installed_version) -> list[str]:
    """The requirement lines that are missing or installed older (another extension's copy),
    given ``installed_version(name) -> version string or None``."""
    unmet = []
    for name, minimum, line in requirements:
        version = installed_version(name)
        if version is None or version_tuple(version) < minimum:
            unmet.append(line)
    return unmet


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, read from its metadata without importing it."""
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
