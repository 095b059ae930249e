"""A model file on whole BraTS cases through the library's inference, with
post-processing thresholds swept on the same raw predictions.

    .venv/bin/python Training/scripts/evaluate_model.py MODEL.safetensors --cases val|test -o OUT.json

``--cases val`` (the shipped recipe's 3D validation patients) chooses the post-processing: among
the (min_component_ml, et_min_ml) pairs within 0.001 of the highest per-case 3D mean Dice, the
smallest thresholds (a larger one would drop satellite lesions that validation never showed).
Where ET_LITERATURE_ML ties with the best ET threshold (validation patients whose enhancing tumour
is far above the thresholds, or absent, cannot tell them apart), the ET rule takes it instead of
switching off: on a patient without enhancing tumour a few invented voxels cost the whole ET Dice.

``--oof MODEL:CASE,CASE,...`` (repeated) pools out-of-fold predictions instead: each fold's model
on the patients it held out (Training/configs/folds.yaml), so ``--cases val`` chooses on all of
them at once.

``--cases test`` reports the test patients, before and after the post-processing in the model
card (or ``--post A,B``); test figures never choose anything. On 2 CPU cores in bfloat16,
about 12 s a case.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from KANTumorSegLib.postprocess import PostprocessConfig, postprocess
from Training.data import CASE_FOLDERS, TEST_CASES, read_nifti_case, voxel_ml
from Training.metrics import REGION_NAMES, brain_slices, mean_metrics, score_test_case

VALIDATION_CASES = ("BraTS2021_00005", "BraTS2021_00024", "BraTS2021_01477", "BraTS2021_01481")
"""The 3D validation patients of Training/configs/retrain.yaml and shipped.yaml."""
MIN_COMPONENT_ML = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
ET_MIN_ML = (0.0, 0.25, 0.5, 1.0, 2.0)
ET_LITERATURE_ML = 0.5
"""About 500 voxels of 1 mm: the order of the threshold below which BraTS-winning pipelines
(nnU-Net's BraTS entries, Isensee et al.) turn predicted enhancing tumour into core."""


def predict(model_path: Path, cases: list[str], root: Path, cache: Path | None) -> dict:
    """case -> (raw model labels, expert labels, brain slices, voxel mL). The volume is read by
    Training's nibabel reader: on the shared BraTS files (LPS, 1 mm) that is the array the
    command's SimpleITK path gives, and the per-case figures equal the command's
    (Testing/test_shipped_model.py scores the command itself).
    With ``cache``, raw labels are kept there per model checksum and case, so a second sweep
    or report of the same model skips the network."""
    from KANTumorSegLib.inference import SlicePredictor, choose_device, choose_precision, segment_volume
    from KANTumorSegLib.weights import load_model

    model, card, preprocessing = load_model(model_path)
    device = choose_device("auto")
    predictor = SlicePredictor(model, device, 16, choose_precision("auto", device, card))
    out = {}
    for case in cases:
        volume, truth = read_nifti_case(root / CASE_FOLDERS[case])
        kept = cache / f"{card['sha256'][:16]}_{case}.npy" if cache else None
        if kept is not None and kept.exists():
            raw = np.load(kept)
        else:
            raw = segment_volume(volume, predictor, preprocessing)
            if kept is not None:
                kept.parent.mkdir(parents=True, exist_ok=True)
                np.save(kept, raw)
        out[case] = (raw, truth, brain_slices(volume), voxel_ml(root / CASE_FOLDERS[case]))
        print(f"{case}: predicted", flush=True)
    return out


def score(predictions: dict, post: PostprocessConfig) -> dict:
    """Per-case figures after ``post`` and the means the documents report."""
    cases, slice_preds, slice_truths = {}, [], []
    for case, (raw, truth, brain, ml) in predictions.items():
        figures, preds, truths = score_test_case(postprocess(raw, ml, post), truth, brain, ml)
        cases[case] = figures
        slice_preds.append(preds)
        slice_truths.append(truths)
    return {
        "postprocessing": post.to_dict(),
        "cases": cases,
        "volume_3d_mean": float(np.mean([c["volume_3d"]["dice_mean"] for c in cases.values()])),
        "volume_3d_regions": {r: float(np.mean([c["volume_3d"][f"dice_{r}"] for c in cases.values()])) for r in REGION_NAMES},
        "worst_case_3d": float(min(c["volume_3d"]["dice_mean"] for c in cases.values())),
        "slice_dice_mean": mean_metrics(np.concatenate(slice_preds), np.concatenate(slice_truths))["dice_mean"],
        "case_slice_dice_mean": float(np.mean([c["tumour_slices"]["dice_mean"] for c in cases.values()])),
        "false_positive_ml": float(sum(c["false_positive_ml_tumour_free_slices"] for c in cases.values())),
    }


def choose(predictions: dict) -> tuple[PostprocessConfig, list[dict]]:
    """Sweep the thresholds; the rule of the module docstring picks one pair."""
    sweep = [score(predictions, PostprocessConfig(a, b)) for a, b in itertools.product(MIN_COMPONENT_ML, ET_MIN_ML)]
    best = max(s["volume_3d_mean"] for s in sweep)
    close = [s for s in sweep if s["volume_3d_mean"] >= best - 0.001]
    chosen = min(close, key=lambda s: (s["postprocessing"]["min_component_ml"], s["postprocessing"]["et_min_ml"]))
    component = chosen["postprocessing"]["min_component_ml"]
    row = {s["postprocessing"]["et_min_ml"]: s["volume_3d_mean"] for s in sweep
           if s["postprocessing"]["min_component_ml"] == component}
    tied = [et for et, score in row.items() if score >= max(row.values()) - 0.001]
    et_min = ET_LITERATURE_ML if ET_LITERATURE_ML in tied else chosen["postprocessing"]["et_min_ml"]
    return PostprocessConfig(component, et_min), sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, nargs="?")
    parser.add_argument("--cases", choices=("val", "test"), required=True)
    parser.add_argument("--oof", action="append", default=[], metavar="MODEL:CASE,CASE",
                        help="a fold's model and the patients it held out (repeated; replaces MODEL)")
    parser.add_argument("--root", type=Path, default=Path("../shared/data/brats_samples"))
    parser.add_argument("--post", default=None, help="min_component_ml,et_min_ml (default: the model card's)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=None, help="keep raw predictions here (per model and case)")
    args = parser.parse_args()
    folds = [(Path(spec.rsplit(":", 1)[0]), spec.rsplit(":", 1)[1].split(",")) for spec in args.oof]
    if not folds:
        if args.model is None:
            parser.error("give MODEL or --oof")
        folds = [(args.model, list(VALIDATION_CASES if args.cases == "val" else TEST_CASES))]
    predictions = {}
    for model, cases in folds:
        predictions.update(predict(model, cases, args.root, args.cache))
    result = {"models": {str(model): cases for model, cases in folds}, "cases": list(predictions)}
    if args.cases == "val":
        chosen, sweep = choose(predictions)
        result.update(raw=score(predictions, PostprocessConfig()), postprocessed=score(predictions, chosen))
        result.update(chosen=chosen.to_dict(), sweep=[{k: s[k] for k in ("postprocessing", "volume_3d_mean",
                                                                         "worst_case_3d", "false_positive_ml")}
                                                      for s in sweep])
        print("chosen:", chosen)
    else:
        if args.post:
            post = PostprocessConfig(*(float(v) for v in args.post.split(",")))
        else:
            card = json.loads(folds[0][0].with_suffix(".json").read_text())
            post = PostprocessConfig.from_dict(card.get("postprocessing"))
        result.update(raw=score(predictions, PostprocessConfig()), postprocessed=score(predictions, post))
    for name in ("raw", "postprocessed"):
        r = result[name]
        print(f"{name}: 3D mean {r['volume_3d_mean']:.3f} (worst {r['worst_case_3d']:.3f}), slices "
              f"{r['slice_dice_mean']:.3f}, per-case slices {r['case_slice_dice_mean']:.3f}, FP {r['false_positive_ml']:.1f} mL")
    for case, figures in result["raw"]["cases"].items():
        print(f"  {case}: 3D raw {figures['volume_3d']['dice_mean']:.3f}", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
