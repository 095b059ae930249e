"""Which loaded volume is which modality, for the 3D Slicer module (KANTumorSeg.py).

Volume names are matched to T1, T1ce, T2 and FLAIR with the command's own file-name endings
(case_files.NAME_PATTERNS); the module's Apply button says what is missing or shared. Standard
library only at module level, so that the module imports cheaply (see slicer_command).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MODALITY_TITLES: dict[str, str] = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}


def modality_of_name(name: str) -> str | None:
    """The modality a volume name denotes (``BraTS20_Training_001_t1ce`` -> ``t1ce``), else None.

    The name is split into words at any non-alphanumeric character and compared without
    case, so ``T1c``, ``case-t2f`` and ``flair`` match; a name whose words denote two
    different modalities (``t1_t2_diff``) is ambiguous and matches none.
    """
    from .case_files import name_tokens

    tokens = name_tokens()
    found = {tokens[word] for word in re.split(r"[^0-9a-z]+", name.lower()) if word in tokens}
    return found.pop() if len(found) == 1 else None


@dataclass
class VolumeMatch:
    """Which loaded volume goes to which modality, by index into the list of names."""

    assigned: dict[str, int] = field(default_factory=dict)
    ambiguous: dict[str, list[int]] = field(default_factory=dict)


def match_volume_names(names: Sequence[str]) -> VolumeMatch:
    """Assign volumes to modalities by name; a modality that several names claim is left
    unassigned (listed in ``ambiguous``) rather than guessed."""
    from .preprocessing import MODALITIES

    candidates: dict[str, list[int]] = {m: [] for m in MODALITIES}
    for index, name in enumerate(names):
        modality = modality_of_name(name)
        if modality is not None:
            candidates[modality].append(index)
    match = VolumeMatch()
    for modality, indices in candidates.items():
        if len(indices) == 1:
            match.assigned[modality] = indices[0]
        elif len(indices) > 1:
            match.ambiguous[modality] = indices
    return match


def input_problems(selected: Mapping[str, tuple[str, str] | None]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Why the inputs cannot run yet: (modalities with no volume, (modality, modality, volume
    name) pairs that share one volume). ``selected`` maps modality -> (node id, name) or None."""
    from .preprocessing import MODALITIES

    missing = [m for m in MODALITIES if not selected.get(m)]
    duplicates = []
    seen: dict[str, str] = {}
    for modality in MODALITIES:
        choice = selected.get(modality)
        if not choice:
            continue
        node_id, name = choice
        if node_id in seen:
            duplicates.append((seen[node_id], modality, name))
        else:
            seen[node_id] = modality
    return missing, duplicates


def case_name_for(t1ce_name: str) -> str:
    """A file-safe case name from the T1ce volume's name, without its modality ending."""
    from .case_files import case_name

    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", t1ce_name).strip("._")
    return case_name({"t1ce": Path(f"{safe}.nrrd")}).strip("._") if safe else "case"
