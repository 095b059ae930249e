"""One case end to end: read, align, segment, and write every output."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from .measurements import tumour_volumes, whole_tumour_parts
from .progress import no_progress

if TYPE_CHECKING:
    from .conformal import ConformalRanges
    from .dicom import Source


@dataclass
class SegmentResult:
    """What a run wrote and measured."""

    case: str
    files: dict[str, Path]
    volumes: dict
    device: str
    precision: str
    warnings: list[dict[str, str]] = field(default_factory=list)
    """The input checks' findings ({"code", "message"}, ``input_checks``); empty when all is well."""


def segment_case(
    paths: dict[str, Source],
    out_dir: Path,
    case: str,
    model_path: Path,
    device: str = "auto",
    labels: str = "brats2020",
    overwrite: bool = False,
    batch_size: int = 16,
    progress: Callable[[str, int, int], None] = no_progress,
    precision: str = "auto",
    confidence: bool = False,
    dicom_seg: bool = False,
    prepare: bool = False,
) -> SegmentResult:
    """Segment one case and write its labelmap, .seg.nrrd, volumes and overview; with
    ``confidence``, also its confidence map and a range around every volume (``confidence.py``);
    with ``dicom_seg`` (DICOM input), a DICOM Segmentation referencing the T1ce series (``dicom.py``);
    with ``prepare``, raw scanner series are registered, resampled and skull-stripped first
    (``prepare.py``), and its brain mask is written too."""
    import SimpleITK as sitk

    from . import __version__
    from .inference import SlicePredictor, choose_device, choose_precision, segment_volume
    from .outputs import AtomicOutputs, output_names, write_labelmap, write_segmentation, write_volumes
    from .overview import write_overview
    from .postprocess import PostprocessConfig, postprocess
    from .volumes import labels_to_reference, load_case
    from .weights import load_model, read_card

    names = output_names(case, confidence, dicom_seg, prepare)
    # Check the output folder, the model card and the images before importing torch (over a
    # second) and before the slow part, so that mistakes show at once.
    stale = tuple(set(output_names(case, True, True, True).values()) - set(names.values()))
    with AtomicOutputs(out_dir, names, overwrite, stale) as outputs:
        card = read_card(model_path)
        prepared = None
        if prepare:
            from .prepare import prepare_case

            prepared = prepare_case(paths, choose_device(device), progress)
            volume, grid = prepared.volume, prepared.grid
        else:
            progress("read", 0, 4)
            volume, grid = load_case(paths)
            progress("read", 4, 4)
        input_warnings = report_input_warnings(volume, grid.grid.GetSpacing())
        torch_device = choose_device(device)
        model, card, preprocessing = load_model(model_path, card)
        chosen_precision = choose_precision(precision, torch_device, card)
        maps: dict[str, np.ndarray] | None = None
        if confidence:
            from .confidence import ConfidencePredictor, calibration_for, doubt_percent, passes_for
            from .conformal import ConformalRanges
            from .ensemble import ensemble_doubt, member_paths

            # A missing member or a bad pass count stops the run before the slow part.
            member_paths(model_path, card)
            predictor = ConfidencePredictor(model, torch_device, batch_size, chosen_precision, passes=passes_for(card))
            maps = {name: np.zeros(volume.shape[1:], dtype=dtype) for name, dtype in predictor.MAP_DTYPES.items()}
        else:
            predictor = SlicePredictor(model, torch_device, batch_size, chosen_precision)
        model_labels = segment_volume(volume, predictor, preprocessing, progress, maps=maps)
        predicted_labels = model_labels
        if maps is not None:
            doubt = ensemble_doubt(maps["doubt"], model_path, card, volume, predicted_labels, predictor.device, batch_size,
                                   precision, progress)
            maps["doubt"] = doubt_percent(doubt, calibration_for(card))
        # The card's post-processing (tiny whole-tumour parts, a trace of enhancing tumour),
        # on the model grid so the overview shows what is written.
        post = PostprocessConfig.from_dict(card.get("postprocessing"))
        model_labels = postprocess(model_labels, float(np.prod(grid.grid.GetSpacing())) / 1000.0, post)
        reference_labels = labels_to_reference(model_labels, grid)

        steps = 5 if prepared else 4
        progress("write", 0, steps)
        write_labelmap(outputs.path("labelmap"), reference_labels, labels)
        progress("write", 1, steps)
        write_segmentation(outputs.path("segmentation"), reference_labels)
        if dicom_seg:
            from .dicom import write_dicom_seg

            write_dicom_seg(outputs.path("dicom_seg"), reference_labels, paths["t1ce"], __version__)
        progress("write", 2, steps)
        written = sitk.GetArrayViewFromImage(reference_labels)
        volumes = tumour_volumes(written, reference_labels.GetSpacing())
        # Counted once, for this run's summary and volumes.json; the Slicer module's "Update
        # volumes" after an edit needs only the volumes.
        volumes["whole_tumour_parts"] = whole_tumour_parts(written, volumes["voxel_volume_ml"])
        if maps is not None:
            confidence_metadata = write_confidence_outputs(outputs.path("confidence"), maps, predicted_labels, model_labels,
                                                           grid, written, volumes, ConformalRanges.from_card(card))
            confidence_metadata["passes"] = predictor.passes
            members = card.get("confidence_members") or []
            if members:
                confidence_metadata["members"] = {"files": members, "passes": int(card.get("confidence_member_passes", 1))}
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
            "warnings": input_warnings,
        }
        if maps is not None:
            metadata["confidence"] = confidence_metadata
        if prepared is not None:
            metadata["preparation"] = prepared.report
        write_volumes(outputs.path("volumes_json"), outputs.path("volumes_csv"), volumes, metadata)
        progress("write", 3, steps)
        if prepared is None:
            write_overview(outputs.path("overview"), volume, model_labels, volumes)
        else:
            # The surgeon's own T1ce slices, as the labels are written.
            oriented = sitk.GetArrayFromImage(sitk.DICOMOrient(reference_labels, "LPS")).transpose(2, 1, 0)
            write_overview(outputs.path("overview"), prepared.on_reference(), oriented, volumes)
            progress("write", 4, steps)
            sitk.WriteImage(prepared.brain_mask, str(outputs.path("brain_mask")), useCompression=True)
        progress("write", steps, steps)
        files = outputs.commit()
    return SegmentResult(case, files, volumes, str(predictor.device), predictor.precision, input_warnings)


def report_input_warnings(volume: np.ndarray, spacing: tuple[float, float, float]) -> list[dict[str, str]]:
    """Run the input checks (``input_checks``) and show each finding as a warning at once, before
    the slow part; the run goes on. Shown every time, not once per process, as each case
    of a cohort or worker request needs its own."""
    import warnings

    from .input_checks import check_inputs

    found = check_inputs(volume, spacing)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        for warning in found:
            warnings.warn(warning["message"], stacklevel=2)
    return found


def write_confidence_outputs(path: Path, maps: dict[str, np.ndarray], predicted: np.ndarray, final: np.ndarray, grid,
                             written: np.ndarray, volumes: dict, conformal: ConformalRanges | None = None) -> dict:
    """Write the confidence map (uint8 percent on the reference grid, as the labelmap) and add
    ``range_ml`` to every region of ``volumes``; the metadata for volumes.json.

    ``predicted``: the model's labels, which the confidence is about; ``final``: the labels
    after post-processing. Where post-processing changed a label, the confidence is the
    complement of the model's confidence in the label it replaced (it removed what the model
    called tumour, or renamed enhancing tumour as core).

    ``conformal`` (``conformal.ConformalRanges`` of the model card, or None): the ranges then
    come from the written volumes and the card's conformal bands, which state their coverage;
    without, from the probability band of ``confidence.py`` (the range map).
    """
    import SimpleITK as sitk

    from .confidence import LABELS_FROM_PASSES, RANGE_DELTA, volume_ranges
    from .volumes import labels_to_reference

    doubt = maps["doubt"]
    changed = predicted != final
    if changed.any():
        doubt = np.where(changed, 100 - doubt, doubt)
    # Doubt, not confidence, is resampled: anything outside the model grid reads 0, certain background.
    on_reference = labels_to_reference(doubt, grid)
    confidence_image = sitk.GetImageFromArray((100 - sitk.GetArrayViewFromImage(on_reference)).astype(np.uint8))
    confidence_image.CopyInformation(on_reference)
    sitk.WriteImage(confidence_image, str(path), useCompression=True)
    metadata = {
        "file": path.name,
        "meaning": "percent estimate that the written label of each voxel is right",
        "labels_from_passes": LABELS_FROM_PASSES,
    }
    if conformal is not None:
        ranges = conformal.ranges({region["name"]: region["volume_ml"] for region in volumes["regions"]})
        metadata["volume_ranges"] = {"method": "split conformal", "meaning": conformal.statement(),
                                     "alpha": conformal.alpha, "eps_ml": conformal.eps_ml,
                                     "n_patients": conformal.n_patients}
    else:
        bits = sitk.GetArrayFromImage(labels_to_reference(maps["range"], grid))
        ranges = volume_ranges(bits, written, volumes["voxel_volume_ml"])
        metadata["range_probability_band"] = [round(0.5 - RANGE_DELTA, 4), round(0.5 + RANGE_DELTA, 4)]
    for region in volumes["regions"]:
        region["range_ml"] = ranges[region["name"]]
    return metadata
