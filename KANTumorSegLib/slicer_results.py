"""What the 3D Slicer module reads from a run: the process's output lines (``--progress jsonl``,
errors and warnings), the overall progress, the failure sentence, and the warnings, volume ranges
and confidence map of the run's outputs, with the defaults that follow from them. Standard
library only at module level (see slicer_command).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Where a share of the progress bar goes: stages of pipeline.segment_case and inference.
STAGE_SPANS: dict[str, tuple[float, float]] = {
    "read": (0.0, 0.05),
    "preprocess": (0.05, 0.20),
    "segment": (0.20, 0.90),
    "write": (0.90, 1.0),
}


PREPARE_STAGE_SPANS: dict[str, tuple[float, float]] = {
    "read": (0.0, 0.05),
    "register T1": (0.05, 0.17),
    "register T2": (0.17, 0.29),
    "register FLAIR": (0.29, 0.41),
    "resample": (0.41, 0.42),
    "skull-strip": (0.42, 0.58),
    "preprocess": (0.58, 0.63),
    "segment": (0.63, 0.97),
    "write": (0.97, 1.0),
}
"""The same for a run with ``--prepare`` (``prepare.PREPARE_STAGES`` first): shares of the prepared
command with the shipped model on the 2-core CPU (``Testing/benchmarks/prepare_time.py``; at load
1.6 of 32.7 s: read 2.4 s, each registration 4.4-4.7 s, resample 0.2 s, skull-strip 5.0 s,
preprocess 1.5 s, segment 9.3 s, write 0.3 s; at load 5 of 100.5 s, registration took 29 %,
skull-stripping 20 %, the model's stages 48 %). With a GPU the registrations, which run on the CPU, take a
larger share of a shorter run: the bar moves slower through them than through the rest."""


ERROR_PREFIX = "kantumorseg: error: "


INTERNAL_ERROR_PREFIX = "kantumorseg: internal error: "


WARNING_PREFIX = "kantumorseg: warning: "


@dataclass(frozen=True)
class OutputLine:
    """One line the process printed, classified: progress, done, error, warning or text."""

    kind: str
    text: str
    stage: str = ""
    done: int = 0
    total: int = 0
    files: dict = field(default_factory=dict)


def parse_output_line(line: str) -> OutputLine:
    """Classify one line of the command's merged stdout and stderr."""
    from .progress import parse_progress_line

    text = line.rstrip("\r\n")
    progress = parse_progress_line(text)
    if progress is not None:
        stage, done, total = progress
        return OutputLine("progress", text, stage, done, total)
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict) and data.get("stage") == "done":
            return OutputLine("done", text, "done", files=dict(data.get("files", {})))
    if text.startswith(ERROR_PREFIX):
        return OutputLine("error", text[len(ERROR_PREFIX):])
    if text.startswith(INTERNAL_ERROR_PREFIX):
        return OutputLine("error", "Internal error: " + text[len(INTERNAL_ERROR_PREFIX):])
    if text.startswith(WARNING_PREFIX):
        return OutputLine("warning", text[len(WARNING_PREFIX):])
    return OutputLine("text", text)


def overall_fraction(stage: str, done: int, total: int, prepare: bool = False) -> float | None:
    """How far the whole run is (0 to 1) at a progress step, None for an unknown stage;
    ``prepare``: the run has ``--prepare``."""
    spans = PREPARE_STAGE_SPANS if prepare else STAGE_SPANS
    if stage not in spans:
        return None
    start, end = spans[stage]
    share = min(max(done / total, 0.0), 1.0) if total > 0 else 1.0
    return start + (end - start) * share


def failure_message(error_lines: Sequence[str], return_code: int | None) -> str:
    """What to tell the user when the process failed: its own last error sentence if it
    printed one (``kantumorseg: error: ...``), else the exit code."""
    if error_lines:
        return error_lines[-1]
    if return_code in (130, 143) or (return_code is not None and return_code < 0):
        return "The segmentation was stopped before it finished; no output was written."
    return f"The segmentation process failed (exit code {return_code}); see the log for details."


@dataclass
class ResultNotes:
    """What the module shows beside the segments, from the command's ``<case>_volumes.json``.

    warnings: the messages of its ``warnings`` list (inputs the model was not made for);
    ranges: region -> (low, high) mL, present when the run had ``--confidence``;
    voxels: region -> voxel count, to tell whether an edited region still has its range.
    Outputs without these fields (older commands) give empty ones.
    """

    warnings: list[str] = field(default_factory=list)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    voxels: dict[str, int] = field(default_factory=dict)


def result_notes(volumes: Mapping) -> ResultNotes:
    """The warnings, volume ranges and voxel counts of a parsed ``<case>_volumes.json``."""
    notes = ResultNotes()
    for warning in volumes.get("warnings") or []:
        if isinstance(warning, Mapping) and warning.get("message"):
            notes.warnings.append(str(warning["message"]))
    for region in volumes.get("regions") or []:
        notes.voxels[region["name"]] = int(region["voxels"])
        low_high = region.get("range_ml")
        if isinstance(low_high, Sequence) and len(low_high) == 2:
            notes.ranges[region["name"]] = (float(low_high[0]), float(low_high[1]))
    return notes


def current_ranges(notes: ResultNotes, regions: Sequence[Mapping]) -> dict[str, tuple[float, float]]:
    """The ranges that still describe the measured regions: those of regions whose voxel count
    is the command's (a region changed by an edit no longer has the model's range)."""
    return {r["name"]: notes.ranges[r["name"]] for r in regions
            if r["name"] in notes.ranges and notes.voxels.get(r["name"]) == int(r["voxels"])}


def range_text(low_high: tuple[float, float] | None) -> str:
    """A range as the command's summary prints it (``165.2-180.1``); empty when there is none."""
    return f"{low_high[0]:.1f}-{low_high[1]:.1f}" if low_high else ""


def confidence_file(files: Mapping[str, str]) -> Path | None:
    """The run's ``<case>_confidence.nii.gz`` (``--confidence``), from its done line or beside its
    volumes file; None when the run wrote none."""
    path = files.get("confidence")
    if not path and files.get("volumes_json"):
        volumes = str(files["volumes_json"])
        path = volumes[: -len("_volumes.json")] + "_confidence.nii.gz" if volumes.endswith("_volumes.json") else None
    return Path(path) if path and Path(path).is_file() else None


def confidence_by_default(device_choice: str, resolved_device: str | None) -> bool:
    """Whether the Confidence option starts on: on a CUDA GPU (chosen, or the one the automatic
    choice found) the extra passes cost well under the run's time; on a CPU it is the user's call."""
    return device_choice == "cuda" or (device_choice == "auto" and resolved_device == "cuda")


SHOW_3D_MAX_VOXELS = 20_000_000
"""Reference grids with more voxels than this (512 x 512 x 80 and up) start without closed
surfaces: building them takes seconds and slows every edit; Show 3D turns them on."""


def show_3d_by_default(grid_voxels: int) -> bool:
    """Whether the result's closed surfaces (3D view) are built at once."""
    return grid_voxels <= SHOW_3D_MAX_VOXELS
