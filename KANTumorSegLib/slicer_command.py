"""The command line the 3D Slicer module launches and the environment it launches it in.

KANTumorSeg.py (the module) runs ``kantumorseg segment`` in a background process (a long-lived
``kantumorseg worker``, see slicer_process, or a process of its own). The ``slicer_*`` modules
hold the parts of the module that need no Slicer, so that they are tested: volume names
(slicer_inputs), this command line (slicer_command), the process's output and the run's notes
(slicer_results), the requirements list (slicer_requirements), segments and the volume table
(slicer_segments), and the processes (slicer_process). At module level they import only the
standard library, so that the module imports cheaply; numpy-based helpers import inside.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

LIBRARY_PACKAGE = "KANTumorSegLib"


def build_command(
    python: str,
    inputs: Mapping[str, str | Path],
    output_dir: str | Path,
    case_name: str,
    device: str,
    model: str | Path,
    labels: str,
    confidence: bool = False,
    prepare: bool = False,
) -> list[str]:
    """The exact ``python -m KANTumorSegLib segment ...`` command the module launches;
    ``confidence`` adds ``--confidence`` (a confidence map and volume ranges, issue 14), ``prepare``
    adds ``--prepare`` (raw scanner series registered and skull-stripped first, issue 18)."""
    from .preprocessing import MODALITIES

    command = [str(python), "-m", LIBRARY_PACKAGE, "segment"]
    for modality in MODALITIES:
        command += [f"--{modality}", str(inputs[modality])]
    command += ["-o", str(output_dir), "--case-name", case_name, "--device", device,
                "--model", str(model), "--labels", labels, "--progress", "jsonl", "--overwrite"]
    return command + (["--confidence"] if confidence else []) + (["--prepare"] if prepare else [])


def worker_arguments(command: Sequence[str]) -> list[str]:
    """The arguments of a ``build_command`` line after its ``python -m KANTumorSegLib`` head:
    the ``segment ...`` request a Worker takes."""
    if list(command[1:3]) != ["-m", LIBRARY_PACKAGE]:
        raise ValueError(f"not a '<python> -m {LIBRARY_PACKAGE} ...' command: {list(command[:3])}")
    return list(command[3:])


def library_parent() -> Path:
    """The folder holding the KANTumorSegLib package (in Slicer: the scripted-modules folder)."""
    return Path(__file__).resolve().parent.parent


def child_environment(environ: Mapping[str, str], parent: Path | None = None) -> dict[str, str]:
    """Variables to add to the child's environment so that ``-m KANTumorSegLib`` finds this
    copy of the package, and its output arrives line by line (not in 8 kB blocks)."""
    parent = parent or library_parent()
    existing = environ.get("PYTHONPATH", "")
    return {
        "PYTHONPATH": str(parent) + (os.pathsep + existing if existing else ""),
        "PYTHONUNBUFFERED": "1",
    }
