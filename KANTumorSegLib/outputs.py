"""Everything ``kantumorseg segment`` writes, written atomically.

Files are first written into a hidden temporary folder inside the output folder and
renamed into place only when all of them exist, so an interrupted or failed run leaves
nothing behind, and an existing output is never replaced without ``overwrite``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import KANTumorSegError
from .labels import SEGMENTS, terminology, to_convention
from .measurements import volumes_csv


def output_names(case: str, confidence: bool = False, dicom_seg: bool = False, prepare: bool = False) -> dict[str, str]:
    """The file name of each output of a case (with ``--confidence``, its confidence map too;
    with ``--dicom-seg``, its DICOM Segmentation; with ``--prepare``, its brain mask)."""
    names = {
        "labelmap": f"{case}_seg.nii.gz",
        "segmentation": f"{case}.seg.nrrd",
        "volumes_json": f"{case}_volumes.json",
        "volumes_csv": f"{case}_volumes.csv",
        "overview": f"{case}_overview.png",
    }
    if confidence:
        names["confidence"] = f"{case}_confidence.nii.gz"
    if dicom_seg:
        names["dicom_seg"] = f"{case}_seg.dcm"
    if prepare:
        names["brain_mask"] = f"{case}_brain_mask.nii.gz"
    return names


def refuse_existing(out_dir: Path, names: dict[str, str]) -> None:
    """Refuse to run when any of these outputs already exists in ``out_dir`` (no --overwrite)."""
    existing = [n for n in names.values() if (out_dir / n).exists()]
    if existing:
        raise KANTumorSegError(f"{out_dir / existing[0]} already exists; use --overwrite to replace it or choose another -o folder.")


class AtomicOutputs:
    """A staging folder in ``out_dir`` whose files are moved into place on ``commit``."""

    def __init__(self, out_dir: Path, names: dict[str, str], overwrite: bool, stale: tuple[str, ...] = ()) -> None:
        self.out_dir = out_dir
        self.names = names
        self.overwrite = overwrite
        # Outputs of an earlier run that this run does not write (a confidence map, after a run
        # without --confidence): removed on commit with --overwrite, so none is left describing
        # other labels.
        self.stale = stale
        self.staging: Path | None = None
        self.created_out_dir = False

    def __enter__(self) -> AtomicOutputs:
        self.created_out_dir = not self.out_dir.exists()
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise KANTumorSegError(f"Output folder {self.out_dir} could not be created ({error.strerror}).") from None
        if not self.out_dir.is_dir():
            raise KANTumorSegError(f"Output path {self.out_dir} exists and is not a folder.")
        if not self.overwrite:
            refuse_existing(self.out_dir, self.names)
        try:
            self.staging = Path(tempfile.mkdtemp(prefix=".kantumorseg-", dir=self.out_dir))
        except OSError as error:
            raise KANTumorSegError(f"Output folder {self.out_dir} is not writable ({error.strerror}).") from None
        return self

    def path(self, key: str) -> Path:
        assert self.staging is not None
        return self.staging / self.names[key]

    def commit(self) -> dict[str, Path]:
        """Move every staged file into the output folder."""
        assert self.staging is not None
        final: dict[str, Path] = {}
        try:
            for key, name in self.names.items():
                target = self.out_dir / name
                os.replace(self.path(key), target)
                final[key] = target
        except BaseException:
            # Interrupted halfway through the renames: take back the files already moved,
            # so that a case never has half of its outputs.
            for target in final.values():
                target.unlink(missing_ok=True)
            raise
        if self.overwrite:
            for name in self.stale:
                (self.out_dir / name).unlink(missing_ok=True)
        return final

    def __exit__(self, exc_type, exc, traceback) -> None:
        with interrupts_deferred():
            if self.staging is not None:
                shutil.rmtree(self.staging, ignore_errors=True)
            if exc_type is not None and self.created_out_dir:
                # A failed run leaves no trace: not even the output folder it created.
                try:
                    self.out_dir.rmdir()
                except OSError:
                    pass


@contextmanager
def interrupts_deferred():
    """Hold SIGINT and SIGTERM until the block ends, so that an interrupt arriving during
    cleanup cannot leave half a staging folder; it is delivered right after."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def write_labelmap(path: Path, labels: sitk.Image, convention: str) -> None:
    """The labelmap on the reference grid as NIfTI, in the chosen label convention."""
    array = to_convention(sitk.GetArrayViewFromImage(labels), convention)
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(labels)
    sitk.WriteImage(image, str(path), useCompression=True)


def write_segmentation(path: Path, labels: sitk.Image) -> None:
    """A Slicer .seg.nrrd with NCR, ED and ET segments, colours and SNOMED CT terminology."""
    import slicerio

    voxels = sitk.GetArrayFromImage(labels).transpose(2, 1, 0)
    direction = np.array(labels.GetDirection()).reshape(3, 3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * np.array(labels.GetSpacing())
    ijk_to_lps[:3, 3] = labels.GetOrigin()
    segmentation = {
        "voxels": np.ascontiguousarray(voxels, dtype=np.uint8),
        "ijkToLPS": ijk_to_lps,
        "encoding": "gzip",
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "segments": [
            {"id": s.id, "labelValue": s.label, "layer": 0, "name": s.name, "color": list(s.color),
             "status": "completed", "terminology": terminology(s)}
            for s in SEGMENTS
        ],
    }
    slicerio.write_segmentation(str(path), segmentation, compression_level=6)


def write_volumes(json_path: Path, csv_path: Path, volumes: dict, metadata: dict) -> None:
    json_path.write_text(json.dumps({**metadata, **volumes}, indent=2) + "\n")
    csv_path.write_text(volumes_csv(volumes))
