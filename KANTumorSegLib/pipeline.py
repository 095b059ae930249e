"""One case end to end: read, align, segment, and write every output."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .measurements import tumour_volumes, whole_tumour_parts
from .progress import no_progress


@dataclass
class SegmentResult:
    """What a run wrote and measured."""

    case: str
    files: dict[str, Path]
    volumes: dict
    device: str
    precision: str


def segment_case(
    paths: dict[str, Path],
    out_dir: Path,
    case: str,
    model_path: Path,
    device: str = "auto",
    labels: str = "brats2020",
    overwrite: bool = False,
    batch_size: int = 16,
    progress: Callable[[str, int, int], None] = no_progress,
    precision: str = "auto",
) -> SegmentResult:
    """Segment one case and write its labelmap, .seg.nrrd, volumes and overview."""
    import SimpleITK as sitk

    from . import __version__
    from .inference import SlicePredictor, choose_device, choose_precision, segment_volume
    from .outputs import AtomicOutputs, output_names, write_labelmap, write_segmentation, write_volumes
    from .overview import write_overview
    from .volumes import labels_to_reference, load_case
    from .weights import load_model, read_card

    names = output_names(case)
    # Check the output folder, the model card and the images before importing torch (over a
    # second) and before the slow part, so that mistakes show at once.
    with AtomicOutputs(out_dir, names, overwrite) as outputs:
        card = read_card(model_path)
        progress("read", 0, 4)
        volume, grid = load_case(paths)
        progress("read", 4, 4)
        torch_device = choose_device(device)
        model, card, preprocessing = load_model(model_path, card)
        predictor = SlicePredictor(model, torch_device, batch_size, choose_precision(precision, torch_device, card))
        model_labels = segment_volume(volume, predictor, preprocessing, progress)
        reference_labels = labels_to_reference(model_labels, grid)

        steps = 4
        progress("write", 0, steps)
        write_labelmap(outputs.path("labelmap"), reference_labels, labels)
        progress("write", 1, steps)
        write_segmentation(outputs.path("segmentation"), reference_labels)
        progress("write", 2, steps)
        written = sitk.GetArrayViewFromImage(reference_labels)
        volumes = tumour_volumes(written, reference_labels.GetSpacing())
        # Counted once, for this run's summary and volumes.json; the Slicer module's "Update
        # volumes" after an edit needs only the volumes.
        volumes["whole_tumour_parts"] = whole_tumour_parts(written, volumes["voxel_volume_ml"])
        metadata = {
            "case": case,
            "inputs": {m: str(p) for m, p in paths.items()},
            "reference": "t1ce",
            "model": {"file": str(model_path), "sha256": card["sha256"], "name": card.get("name", "")},
            "label_convention": labels,
            # The device and precision that produced these labels: bf16 on a CPU can move a
            # few boundary voxels against float32 (docs/PERFORMANCE.md, accuracy).
            "inference": {"device": str(predictor.device), "precision": predictor.precision},
            "kantumorseg_version": __version__,
        }
        write_volumes(outputs.path("volumes_json"), outputs.path("volumes_csv"), volumes, metadata)
        progress("write", 3, steps)
        write_overview(outputs.path("overview"), volume, model_labels, volumes)
        progress("write", 4, steps)
        files = outputs.commit()
    return SegmentResult(case, files, volumes, str(predictor.device), predictor.precision)
