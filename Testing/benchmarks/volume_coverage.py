"""Conformal volume ranges of a model: fit the bands on patients its models never trained on,
estimate their coverage, and report it on the test patients (issue 19).

Each case's written volumes come from ``pipeline.segment_case``, the command's own code path
(reading, preprocessing, the model, the card's post-processing, the labels on the T1ce grid),
and its expert volumes from the case's segmentation on the same grid
(``measurements.tumour_volumes``). Volumes are kept in the output JSON by model checksum and
case, so a rerun (another alpha or eps, another test model) re-fits without the network.

Calibration patients are given with the model that never saw them:

- ``--oof MODEL:CASE,CASE,...`` (repeatable): out-of-fold mode; each fold model predicts the
  patients it held out, and the bands (``conformal.ConformalRanges``) are fitted on all of their
  residuals, for the final model ``--model`` (CV+: the final model trained on them all);
- the same flag with the final model itself and its validation patients works for a model
  without folds (the shipped model's 4 validation patients are too few for 90 %: use ``--alpha``).

It reports, per region (NCR, ED, ET, WT, TC): the coverage estimated by leave-one-patient-out over
the calibration patients (each patient's range from the band of the others), the coverage on
the test patients (``--model``'s volumes, bands fitted on all calibration patients), and the
median width of the range as a fraction of the written volume (the issue asks for the whole
tumour's at most 0.60), for NCR and ED both from the nested regions (shipped) and with bands of
their own. ``--eps-sweep`` adds the leave-one-out figures for other eps (calibration only: the
test patients choose nothing). ``--write-card`` writes the bands into ``--model``'s card.

    python Testing/benchmarks/volume_coverage.py --out runs/volume_coverage \\
        --oof /tmp/models/fold0.safetensors:BraTS2021_00005,BraTS2021_00024,BraTS2021_01477,BraTS2021_01481 \\
        --oof /tmp/models/fold1.safetensors:Brats18_2013_2_1,BraTS2021_00002,BraTS2021_01482,BraTS2021_01484 \\
        --oof /tmp/models/fold2.safetensors:BraTS2021_00003,BraTS2021_00006,BraTS2021_01478,BraTS-GLI-00012-000 \\
        --model /tmp/models/final_s0.safetensors [--write-card]

About 12-20 s a case on 2 CPU cores (the plain command); 19 cases the first time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from KANTumorSegLib import conformal  # noqa: E402
from KANTumorSegLib.conformal import ConformalRanges  # noqa: E402
from Training.data import CASE_FOLDERS, TEST_CASES  # noqa: E402

SAMPLES = Path(os.environ.get("KANTUMORSEG_SAMPLES", REPO.parent / "shared" / "data" / "brats_samples"))
ALL_REGIONS = ("NCR", "ED", "ET", "WT", "TC")
EPS_SWEEP = (0.1, 0.25, 0.5, 1.0, 2.0)


def parse_group(text: str) -> tuple[Path, list[str]]:
    """``MODEL:CASE,CASE`` -> (model path, cases); every case must be a shared 3D case."""
    model, _, cases = text.rpartition(":")
    names = [c for c in cases.split(",") if c]
    unknown = [c for c in names if c not in CASE_FOLDERS]
    if not model or not names or unknown:
        raise argparse.ArgumentTypeError(f"--oof needs MODEL:CASE,CASE,... with cases of Training.data.CASE_FOLDERS "
                                         f"(unknown: {', '.join(unknown) or 'none'})")
    return Path(model), names


def trained_cases(card: dict) -> set[str]:
    """The 3D cases a model's card says it trained on (training_config's train_cases less its
    validation cases, unless those were trained on too)."""
    data = card.get("training_config", {}).get("data", {})
    trained = set(data.get("train_cases", []))
    if not data.get("val_in_train", False):
        trained -= set(data.get("val_cases", []))
    return trained


def expert_volumes(folder: Path) -> dict[str, float]:
    """The expert's volumes (mL) of a case, on its segmentation's own grid (the T1ce grid the
    command writes its labels on); BraTS 2023 label 3 is enhancing tumour."""
    import numpy as np
    import SimpleITK as sitk

    from KANTumorSegLib.measurements import tumour_volumes
    from Training.data import find_case_files

    files, is_2023 = find_case_files(folder)
    seg = sitk.ReadImage(str(files["seg"]))
    labels = np.rint(sitk.GetArrayFromImage(seg)).astype(np.uint8)
    if is_2023:
        labels[labels == 3] = 4
    return {r["name"]: r["volume_ml"] for r in tumour_volumes(labels, seg.GetSpacing())["regions"]}


def written_volumes(folder: Path, model: Path, device: str, precision: str) -> tuple[dict[str, float], float]:
    """The volumes (mL) the command writes for a case with this model, and the seconds it took."""
    from KANTumorSegLib.pipeline import segment_case
    from Training.data import find_case_files

    files, _ = find_case_files(folder)
    paths = {m: files[m] for m in ("t1", "t1ce", "t2", "flair")}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = segment_case(paths, Path(out), "case", model, device=device, precision=precision)
    return {r["name"]: r["volume_ml"] for r in result.volumes["regions"]}, round(time.perf_counter() - start, 2)


def case_volumes(case: str, model: Path, sha256: str, cache: dict, args) -> dict:
    """{"written", "expert", "seconds"} of a case under a model, from ``cache`` (key
    ``sha256[:16]:case``) or computed and added to it."""
    key = f"{sha256[:16]}:{case}"
    if key not in cache:
        print(f"{case} with {model.name} ...", file=sys.stderr, flush=True)
        folder = SAMPLES / CASE_FOLDERS[case]
        written, seconds = written_volumes(folder, model, args.device, args.precision)
        cache[key] = {"case": case, "model": str(model), "written": written, "expert": expert_volumes(folder),
                      "seconds": seconds}
    return cache[key]


def residuals(rows: list[dict], eps_ml: float, regions=ALL_REGIONS) -> dict[str, list[float]]:
    """Each region's log-ratio residuals (``conformal.log_residual``) over the rows."""
    return {r: [conformal.log_residual(row["written"][r], row["expert"][r], eps_ml) for row in rows] for r in regions}


def judge(bands: ConformalRanges, row: dict) -> dict:
    """One patient's ranges, whether the expert's volume is inside, and each width as a fraction
    of the written volume."""
    ranges = bands.ranges(row["written"])
    return {"ranges": ranges,
            "inside": {r: ranges[r][0] <= row["expert"][r] <= ranges[r][1] for r in ALL_REGIONS},
            "width_fraction": {r: (ranges[r][1] - ranges[r][0]) / row["written"][r] if row["written"][r] > 0 else None
                               for r in ALL_REGIONS}}


def fit(rows: list[dict], alpha: float, eps_ml: float, own_subregions: bool) -> ConformalRanges | None:
    """Bands for WT, TC, ET (with NCR, ED too when ``own_subregions``); None when too few rows."""
    regions = ALL_REGIONS if own_subregions else conformal.REGIONS
    try:
        return ConformalRanges.fit(residuals(rows, eps_ml, regions), alpha, eps_ml)
    except ValueError:
        return None


def summarise(judged: list[dict]) -> dict:
    """Coverage per region and over all (region, patient) pairs; median width fractions."""
    out: dict = {"patients": len(judged)}
    if not judged:
        return out
    out["inside"] = {r: sum(j["inside"][r] for j in judged) for r in ALL_REGIONS}
    out["inside_all"] = f"{sum(out['inside'].values())} / {len(ALL_REGIONS) * len(judged)}"
    out["coverage_all"] = round(sum(out["inside"].values()) / (len(ALL_REGIONS) * len(judged)), 4)
    out["coverage_wt_tc_et"] = round(sum(out["inside"][r] for r in conformal.REGIONS) / (3 * len(judged)), 4)
    out["median_width_fraction"] = {}
    for r in ALL_REGIONS:
        widths = [j["width_fraction"][r] for j in judged if j["width_fraction"][r] is not None]
        out["median_width_fraction"][r] = round(statistics.median(widths), 4) if widths else None
    return out


def leave_one_out(rows: list[dict], alpha: float, eps_ml: float, own_subregions: bool) -> dict:
    """Each calibration patient judged by the band of the others."""
    judged, cases = [], {}
    for i, row in enumerate(rows):
        bands = fit(rows[:i] + rows[i + 1:], alpha, eps_ml, own_subregions)
        if bands is None:
            return {"error": f"{len(rows) - 1} patients are too few for coverage {1 - alpha:.0%}"}
        judged.append(judge(bands, row))
        cases[row["case"]] = judged[-1]
    return {"summary": summarise(judged), "cases": cases}


def analyse(calibration: list[dict], test: list[dict], alpha: float, eps_ml: float) -> dict:
    """Bands, leave-one-out and test figures, for NCR/ED nested (shipped) and with own bands."""
    out: dict = {}
    for variant, own in (("nested NCR, ED (shipped)", False), ("own bands for NCR, ED", True)):
        bands = fit(calibration, alpha, eps_ml, own)
        entry: dict = {"bands": bands.to_card()["log_halfwidth"] if bands else None,
                       "leave_one_out": leave_one_out(calibration, alpha, eps_ml, own)}
        if bands is not None and test:
            judged = {row["case"]: judge(bands, row) for row in test}
            entry["test"] = {"summary": summarise(list(judged.values())), "cases": judged}
        out[variant] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for volume_coverage.json (its volumes are reused)")
    parser.add_argument("--oof", type=parse_group, action="append", required=True, metavar="MODEL:CASE,CASE",
                        help="a model and calibration patients it never trained on (repeat per fold)")
    parser.add_argument("--model", type=Path, help="the model whose ranges are reported on --test (and written with --write-card)")
    parser.add_argument("--test", nargs="*", default=list(TEST_CASES), help="test patients (default: Training.data.TEST_CASES)")
    parser.add_argument("--alpha", type=float, default=conformal.ALPHA)
    parser.add_argument("--eps-ml", type=float, default=conformal.EPS_ML)
    parser.add_argument("--eps-sweep", action="store_true", help=f"leave-one-out figures for eps in {EPS_SWEEP} too")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--write-card", action="store_true", help="write the bands (nested NCR, ED) into --model's card")
    args = parser.parse_args(argv)

    from KANTumorSegLib.weights import read_card, update_card

    if not SAMPLES.is_dir():
        raise SystemExit(f"The BraTS samples are not at {SAMPLES}; set KANTUMORSEG_SAMPLES to their folder.")
    report_path = args.out / "volume_coverage.json"
    cache: dict = json.loads(report_path.read_text()).get("volumes", {}) if report_path.exists() else {}
    cards = {}
    seen: set[str] = set()
    for model, cases in args.oof:
        cards[model] = read_card(model)
        leaked = sorted(set(cases) & trained_cases(cards[model]))
        if leaked:
            raise SystemExit(f"{model} trained on {', '.join(leaked)} (its card's training_config): not a calibration patient for it.")
        if seen & set(cases):
            raise SystemExit(f"{', '.join(sorted(seen & set(cases)))} given twice in --oof.")
        seen |= set(cases)
    calibration = [case_volumes(case, model, cards[model]["sha256"], cache, args) for model, cases in args.oof for case in cases]
    test: list[dict] = []
    if args.model is not None:
        cards[args.model] = read_card(args.model)
        leaked = sorted(set(args.test) & (trained_cases(cards[args.model]) | seen))
        if leaked:
            raise SystemExit(f"test patients {', '.join(leaked)} were trained on or calibrate the bands.")
        test = [case_volumes(case, args.model, cards[args.model]["sha256"], cache, args) for case in args.test]

    # The residuals are of the written (post-processed) volumes: a fold model whose card post-processes
    # otherwise than --model's measures another product's errors.
    reference = cards.get(args.model, next(iter(cards.values()))).get("postprocessing")
    differing = [str(m) for m, c in cards.items() if c.get("postprocessing") != reference]
    if differing:
        print(f"warning: post-processing differs from {args.model or 'the first model'}'s in {', '.join(differing)}",
              file=sys.stderr)
    report: dict = {
        "command": "Testing/benchmarks/volume_coverage.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "postprocessing": {str(m): c.get("postprocessing") for m, c in cards.items()},
        "postprocessing_differs": differing,
        "config": {"alpha": args.alpha, "eps_ml": args.eps_ml, "residual": "|log((written + eps) / (expert + eps))|",
                   "device": args.device, "precision": args.precision},
        "models": {str(m): {"name": c.get("name", ""), "sha256": c["sha256"]} for m, c in cards.items()},
        "calibration_groups": {str(m): cases for m, cases in args.oof},
        "test_cases": args.test if args.model is not None else [],
        "results": analyse(calibration, test, args.alpha, args.eps_ml),
    }
    if args.eps_sweep:
        report["eps_sweep_leave_one_out"] = {
            str(eps): {variant: entry["leave_one_out"].get("summary", entry["leave_one_out"])
                       for variant, entry in analyse(calibration, [], args.alpha, eps).items()} for eps in EPS_SWEEP}
    shipped = fit(calibration, args.alpha, args.eps_ml, own_subregions=False)
    if args.write_card:
        if args.model is None or shipped is None:
            raise SystemExit("--write-card needs --model and enough calibration patients for a finite band.")
        provenance = {"patients": [row["case"] for row in calibration],
                      "models": {c["sha256"]: cases for m, cases in args.oof for c in (cards[m],)},
                      "command": report["command"]}
        bands = ConformalRanges(shipped.log_halfwidth, shipped.alpha, shipped.eps_ml, shipped.n_patients, provenance)
        update_card(args.model, {conformal.CARD_KEY: bands.to_card()})
        report["written_to_card"] = str(args.model.with_suffix(".json"))
    report["volumes"] = cache
    args.out.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    brief = {variant: {"bands": e["bands"], "leave_one_out": e["leave_one_out"].get("summary", e["leave_one_out"]),
                       "test": e.get("test", {}).get("summary")} for variant, e in report["results"].items()}
    print(json.dumps(brief, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
