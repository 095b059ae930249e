"""How far to trust ``kantumorseg segment --confidence``: measured on patients the model never saw.

For each case (default: the 7 test patients of issue 14; ``--calibration`` adds 7 other shared 3D
cases outside training, on which the estimator's settings may be chosen without touching the test
patients) it runs the model under all 8 test-time transforms once, through the library's own
reading, preprocessing and pasting (``volumes.load_case``, ``inference.segment_volume``), and
derives from those passes:

- AUROC of low confidence for wrong voxels, over the voxels within 10 mm of predicted or expert
  tumour (wrong: the written label differs from the expert's), for the shipped estimator
  (``confidence.py``, in whole percent as written) and for the baseline, one pass's own sigmoid
  margin (the smallest max(p, 1 - p) of WT, TC, ET), plus the alternatives (margin of the averaged
  passes, mean label probability over 1, 2, 4 and 8 passes);
- a reliability diagram (stated confidence against observed accuracy, pooled over the test voxels);
- 3D Dice (WT, TC, ET) of the one-pass labels and of the labels of 2, 4 and 8 averaged passes;
- per region, whether the expert volume falls in ``range_ml`` and the range's width, for the
  shipped band (``confidence.RANGE_DELTA``) and other bands;
- with ``--members M1.safetensors ...`` (issue 19), each member's region probabilities (one pass,
  its own card's preprocessing, ``ensemble.RegionProbabilityPredictor``) and the AUROC of: the
  members' mean label probability (main model's first pass and each member, 1 pass each), their
  vote (how many of them decode the written label, ties broken by that mean), the combination
  (main model's 8 passes averaged, counting once, with each member), and that combination as the
  command writes it (written labels, post-processing's complement); with the seconds of each
  member's pass and of the main model's one pass (``seconds``), so that each variant's cost per
  case is known: 1 pass, 8 passes, 1 + members, 8 + members;
- with ``--cost-cases``, seconds of the plain command and of ``--confidence`` on ``--device``, warm
  (in this process, as the Slicer module's worker runs them) and as fresh processes.

It writes ``confidence_eval.json`` and ``reliability.png`` into ``--out``. The whole thing is one
command, to rerun for a new model (about 5 minutes a case on 2 CPU cores; ``--cache`` keeps each
case's figures, so that a second run only redoes the analysis and the timing):

    .venv/bin/python Testing/benchmarks/confidence_eval.py --out docs/figures/confidence --calibration --cache .cache/confidence
    # the cost on a GPU beside the plain command (no evaluation; 3 repeats):
    python3 Testing/benchmarks/confidence_eval.py --device cuda --out runs/confidence_gpu --cases --cost-repeats 3

With ``--calibration`` it prints ``calibration_fitted.to_ship``: the line that gives a new model its
Platt scaling in ``KANTumorSegLib/confidence.py`` (``CALIBRATIONS``); rerun then to see the map as
written. The test figures in "as written" use what the library holds for the model.

Needs the training extras (scipy for the 10 mm distance, matplotlib for the diagram).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from KANTumorSegLib import confidence as conf  # noqa: E402
from KANTumorSegLib.measurements import tumour_volumes  # noqa: E402
from Training.data import CASE_FOLDERS  # noqa: E402
from Training.data import TEST_CASES as TEST_CASE_IDS  # noqa: E402

SAMPLES = Path(os.environ.get("KANTUMORSEG_SAMPLES", REPO.parent / "shared" / "data" / "brats_samples"))
TEST_CASES = {case: CASE_FOLDERS[case] for case in TEST_CASE_IDS}
"""Issue 14's test patients (``Training.data.TEST_CASES``): never used for training or for
choosing the estimator."""
CALIBRATION_CASES = {case: folder for case, folder in CASE_FOLDERS.items()
                     if case not in TEST_CASE_IDS and case != "Brats18_2013_2_1"}
"""The other shared 3D cases, where the Platt scaling is fitted (and the passes, the band and the
label source were chosen). Outside the training of the model shipped until round 5 (HDF5 slices
and Brats18_2013_2_1); a model trained on ``Training.data.TRAIN_CASES`` has seen them, and its
calibration fitted here is then optimistic: the test patients' reliability diagram shows by how much."""
NEAR_MM = 10.0
BANDS = (0.1, 0.2, 0.3, 0.4, 0.45, 0.49)
REGION_ORDER = ("NCR", "ED", "ET", "WT", "TC")


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for ``positive`` (Mann-Whitney, ties halved); NaN
    when one class is empty."""
    from scipy.stats import rankdata

    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class PassesPredictor(conf.ConfidencePredictor):
    """Keeps every pass's region probabilities as maps ``p{pass}_{region}`` (2D, as pasted)."""

    def window_maps(self, passes, labels) -> dict[str, np.ndarray]:
        regions = conf.region_probabilities(passes, self.head).cpu().numpy()
        return {f"p{t}_{r}": regions[t, :, r] for t in range(regions.shape[0]) for r in range(3)}


def run_passes(folder: Path, model_path: Path, device: str, batch_size: int):
    """(passes (T, Z, 3, X, Y) region probabilities, expert labels (Z, X, Y), voxel mL, spacing, model card, precision)."""
    import SimpleITK as sitk

    from KANTumorSegLib.inference import choose_device, choose_precision, segment_volume
    from KANTumorSegLib.volumes import load_case, to_model_array
    from KANTumorSegLib.weights import load_model
    from Training.data import find_case_files

    files, is_2023 = find_case_files(folder)
    volume, grid = load_case({m: files[m] for m in ("t1", "t1ce", "t2", "flair")})
    torch_device = choose_device(device)
    model, card, preprocessing = load_model(model_path)
    predictor = PassesPredictor(model, torch_device, batch_size, choose_precision("auto", torch_device, card), passes=8)
    shape = volume.shape[1:]
    maps = {f"p{t}_{r}": np.zeros(shape, dtype=np.float32) for t in range(8) for r in range(3)}
    segment_volume(volume, predictor, preprocessing, maps=maps)
    passes = np.stack([np.stack([maps.pop(f"p{t}_{r}").transpose(2, 0, 1) for r in range(3)], axis=1) for t in range(8)])
    truth = np.rint(to_model_array(sitk.ReadImage(str(files["seg"])), grid.grid)).astype(np.uint8).transpose(2, 0, 1)
    if is_2023:
        truth[truth == 3] = 4
    spacing = tuple(float(s) for s in grid.grid.GetSpacing())
    return passes, truth, float(np.prod(spacing)) / 1000.0, spacing, card, predictor.precision


def run_member(folder: Path, member: Path, device: str, batch_size: int) -> tuple[np.ndarray, float]:
    """(a member's region probabilities (Z, 3, X, Y) over one pass with its own card's preprocessing,
    seconds of that pass's ``segment_volume``), as ``ensemble.member_doubt`` runs it in the command."""
    from KANTumorSegLib.ensemble import REGION_MAPS, RegionProbabilityPredictor
    from KANTumorSegLib.inference import choose_device, choose_precision, segment_volume
    from KANTumorSegLib.volumes import load_case
    from KANTumorSegLib.weights import load_model
    from Training.data import find_case_files

    files, _ = find_case_files(folder)
    volume, _ = load_case({m: files[m] for m in ("t1", "t1ce", "t2", "flair")})
    torch_device = choose_device(device)
    model, card, preprocessing = load_model(member)
    predictor = RegionProbabilityPredictor(model, torch_device, batch_size, choose_precision("auto", torch_device, card), passes=1)
    maps = {name: np.zeros(volume.shape[1:], dtype=np.float16) for name in REGION_MAPS}
    start = time.perf_counter()
    segment_volume(volume, predictor, preprocessing, maps=maps)
    seconds = time.perf_counter() - start
    return np.stack([maps.pop(name).transpose(2, 0, 1) for name in REGION_MAPS], axis=1).astype(np.float32), round(seconds, 2)


def one_pass_seconds(folder: Path, model_path: Path, device: str, batch_size: int) -> float:
    """Seconds of the main model's plain ``segment_volume`` (one pass) on a case, for the variants' cost."""
    from KANTumorSegLib.inference import SlicePredictor, choose_device, choose_precision, segment_volume
    from KANTumorSegLib.volumes import load_case
    from KANTumorSegLib.weights import load_model
    from Training.data import find_case_files

    files, _ = find_case_files(folder)
    volume, _ = load_case({m: files[m] for m in ("t1", "t1ce", "t2", "flair")})
    torch_device = choose_device(device)
    model, card, preprocessing = load_model(model_path)
    predictor = SlicePredictor(model, torch_device, batch_size, choose_precision("auto", torch_device, card))
    start = time.perf_counter()
    segment_volume(volume, predictor, preprocessing)
    return round(time.perf_counter() - start, 2)


def member_variants(passes, members: list, predicted, written, changed, truth_t, near: np.ndarray, head: str) -> tuple[dict, dict]:
    """Stated confidences and wrongness of the ensemble variants (module docstring), for one case."""
    import torch

    stated: dict[str, np.ndarray] = {}
    wrong: dict[str, np.ndarray] = {}
    wrong_predicted = (predicted != truth_t).numpy()[near]
    singles = [passes[:1]] + [torch.from_numpy(m).unsqueeze(0) for m in members]
    probabilities = torch.stack([conf.label_probability(s, predicted.unsqueeze(0), head).mean(dim=0) for s in singles])
    n = len(singles)
    mean = probabilities.mean(dim=0)
    stated[f"members: mean label probability, {n} models x 1 pass"] = mean.numpy()[near]
    votes = torch.stack([(conf.decode(s[0], head) == predicted) for s in singles]).float().sum(dim=0)
    stated[f"members: vote of {n} models (ties by mean label probability)"] = ((votes + mean) / (n + 1)).numpy()[near]
    stated[f"members: margin of averaged probabilities, {n} models x 1 pass"] = margin(
        torch.stack([s[0] for s in singles]).mean(dim=0).numpy())[near]
    eight = conf.label_probability(passes, predicted.unsqueeze(0), head).mean(dim=0)
    combined = (eight + probabilities[1:].sum(dim=0)) / n
    stated[f"combination: 8 passes + {n - 1} members x 1 pass"] = combined.numpy()[near]
    for key in stated:
        wrong[key] = wrong_predicted
    key = f"combination as written: 8 passes + {n - 1} members, written labels"
    stated[key] = torch.where(changed, 1 - combined, combined).numpy()[near]
    wrong[key] = (written != truth_t).numpy()[near]
    return stated, wrong


def margin(regions: np.ndarray) -> np.ndarray:
    """The baseline: the smallest max(p, 1 - p) over WT, TC, ET, (..., 3, X, Y) -> (..., X, Y)."""
    return np.maximum(regions, 1 - regions).min(axis=-3)


def evaluate_case(name: str, folder: Path, args) -> tuple[dict, dict]:
    """One case's figures and its evaluated voxels (stated confidences and correctness) for pooling."""
    import torch
    from scipy.ndimage import distance_transform_edt

    from Training.metrics import case_metrics

    start = time.perf_counter()
    from KANTumorSegLib.postprocess import PostprocessConfig, postprocess

    passes_np, truth, voxel_ml, spacing, card, precision = run_passes(folder, args.model, args.device, args.batch_size)
    head = card["model"]["head"]
    if head != "regions":
        raise SystemExit("confidence_eval.py evaluates the region head (the shipped model's); this model has the classes head.")
    seconds = time.perf_counter() - start
    passes = torch.from_numpy(passes_np)
    labels = {n: conf.decode(passes[:n].mean(dim=0), head) for n in conf.PASSES}
    predicted = labels[conf.DEFAULT_PASSES] if conf.LABELS_FROM_PASSES else labels[1]
    # What the command writes: the card's post-processing after the model (pipeline.segment_case),
    # and where it changed a label, the complement of the model's confidence (write_confidence_outputs).
    post = PostprocessConfig.from_dict(card.get("postprocessing"))
    written = torch.from_numpy(postprocess(predicted.numpy(), voxel_ml, post))
    changed = written != predicted
    zyx_spacing = (spacing[2], spacing[0], spacing[1])
    near = distance_transform_edt(~((written.numpy() > 0) | (truth > 0)), sampling=zyx_spacing) <= NEAR_MM
    truth_t = torch.from_numpy(truth)

    stated: dict[str, np.ndarray] = {}
    wrong: dict[str, np.ndarray] = {}
    for n in conf.PASSES:
        for source in ("one pass", "averaged"):
            lab = labels[1] if source == "one pass" else labels[n]
            if source == "averaged" and n == 1:
                continue
            key = f"label probability, {n} passes, labels {source}"
            stated[key] = conf.label_probability(passes[:n], lab.unsqueeze(0), head).mean(dim=0).numpy()[near]
            wrong[key] = (lab != truth_t).numpy()[near]
        key = f"margin, {n} passes averaged"
        lab = labels[n]
        stated[key] = margin(passes[:n].mean(dim=0).numpy())[near]
        wrong[key] = (lab != truth_t).numpy()[near]
    shipped = "shipped, before calibration and rounding (written labels)"
    raw = conf.label_probability(passes[:conf.DEFAULT_PASSES], predicted.unsqueeze(0), head).mean(dim=0)
    stated[shipped] = torch.where(changed, 1 - raw, raw).numpy()[near]
    wrong[shipped] = (written != truth_t).numpy()[near]
    baseline = "margin, 1 passes averaged"
    member_seconds = {}
    if args.members:
        members = []
        for member in args.members:
            regions, member_seconds[member.name] = run_member(folder, member, args.device, args.batch_size)
            members.append(regions)
        extra_stated, extra_wrong = member_variants(passes, members, predicted, written, changed, torch.from_numpy(truth),
                                                    near, head)
        stated.update(extra_stated)
        wrong.update(extra_wrong)
        del members

    result: dict = {
        "voxels_evaluated": int(near.sum()),
        "wrong_fraction": {k: float(v.mean()) for k, v in wrong.items() if k in (baseline, shipped)},
        "auroc": {k: auroc(-stated[k], wrong[k]) for k in stated},
        "dice_3d": {},
        "expert_ml": {},
        "ranges": {},
        "seconds_8_passes": round(seconds, 1),
        "seconds": {"main model, 1 pass (segment_volume)": one_pass_seconds(folder, args.model, args.device, args.batch_size)
                    if args.members else None,
                    "members, 1 pass each (segment_volume)": member_seconds},
        "precision": precision,
        "postprocessing": post.to_dict(),
        "voxels_changed_by_postprocessing": int(changed.sum()),
    }
    m = case_metrics(written.numpy(), truth)
    result["dice_3d"]["written (one pass, post-processed)"] = {r: round(m[f"dice_{r}"], 4) for r in ("WT", "TC", "ET")}
    for n in conf.PASSES:
        m = case_metrics(labels[n].numpy(), truth)
        result["dice_3d"][f"{n} passes"] = {r: round(m[f"dice_{r}"], 4) for r in ("WT", "TC", "ET")}
    expert = {r["name"]: r["volume_ml"] for r in tumour_volumes(truth, spacing)["regions"]}
    result["expert_ml"] = expert
    written_ml = {r["name"]: r["volume_ml"] for r in tumour_volumes(written.numpy(), spacing)["regions"]}
    result["written_ml"] = written_ml
    for n in sorted({1, conf.DEFAULT_PASSES}):
        mean = conf.region_probabilities(passes[:n].mean(dim=0), head)
        for delta in BANDS:
            ranges = conf.volume_ranges(conf.range_bits(mean, delta).numpy(), written.numpy(), voxel_ml)
            result["ranges"][f"band {delta}, {n} passes"] = ranges
    per_pass = [{r["name"]: r["volume_ml"] for r in tumour_volumes(conf.decode(passes[t:t + 1].mean(dim=0), head).numpy(),
                                                                    spacing)["regions"]} for t in range(8)]
    result["ranges"]["min-max of the 8 passes' volumes"] = {
        r: [min([p[r] for p in per_pass] + [written_ml[r]]), max([p[r] for p in per_pass] + [written_ml[r]])] for r in REGION_ORDER}
    # With --ship-members the map as the command writes it for a card naming these members is the
    # combination: the Platt scaling is fitted, and "as written" measured, on it.
    chosen = next((k for k in stated if k.startswith("combination as written")), shipped) if args.ship_members else shipped
    arrays = {"raw": stated[chosen], "wrong": wrong[chosen], "baseline": stated[baseline], "baseline_wrong": wrong[baseline]}
    return result, arrays


def cached_case(name: str, folder: Path, args, sha256: str) -> tuple[dict, dict]:
    """:func:`evaluate_case`, kept in ``--cache`` (by model and case) when given, so that the
    analysis can be rerun without the model's passes (minutes per case on a CPU)."""
    from KANTumorSegLib.weights import sha256_of

    if args.cache is None:
        return evaluate_case(name, folder, args)
    members = "".join(f"_{sha256_of(m)[:8]}" for m in args.members) + ("_ship" if args.ship_members else "")
    path = args.cache / f"{sha256[:16]}{members}_{name}_{args.device}_v3.npz"
    if path.exists():
        with np.load(path) as data:
            return json.loads(str(data["result"])), {k: data[k] for k in ("raw", "wrong", "baseline", "baseline_wrong")}
    result, arrays = evaluate_case(name, folder, args)
    args.cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, result=json.dumps(result), **arrays)
    return result, arrays


def as_written(raw: np.ndarray, calibration: tuple[float, float]) -> np.ndarray:
    """The confidence the map holds: the raw label probability recalibrated, in whole percent."""
    import torch

    return np.round(100 * conf.calibrate(torch.from_numpy(raw), calibration).numpy()) / 100


def fit_platt(raws: list[np.ndarray], wrongs: list[np.ndarray], per_case: int = 200_000) -> tuple[float, float]:
    """(a, b) of sigmoid(a logit(raw) + b) fitted to "the label is right" by logistic regression
    (log loss minimised by L-BFGS), each case weighing the same (a fixed-seed sample of its voxels)."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(0)
    xs, ys = [], []
    for raw, wrong in zip(raws, wrongs):
        pick = rng.choice(raw.size, min(per_case, raw.size), replace=False)
        clipped = np.clip(raw[pick].astype(np.float64), 1e-6, 1 - 1e-6)
        xs.append(np.log(clipped / (1 - clipped)))
        ys.append(~wrong[pick])
    x, y = np.concatenate(xs), np.concatenate(ys)
    sign = np.where(y, -1.0, 1.0)

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = w[0] * x + w[1]
        # -log sigmoid(z) for right voxels, -log(1 - sigmoid(z)) for wrong ones, computed stably.
        value = np.logaddexp(0.0, sign * z)
        d = sign / (1.0 + np.exp(-sign * z))
        return float(value.mean()), np.array([(d * x).mean(), d.mean()])

    result = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
    return float(result.x[0]), float(result.x[1])


def reliability(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> dict:
    """Stated confidence against observed accuracy in 10 bins, pooled over cases; writes the PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.linspace(0, 1, 11)
    table: dict = {}
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    for label, (stated, wrong) in curves.items():
        # A stated 1.0 goes in the last bin.
        index = np.clip(np.digitize(stated, edges) - 1, 0, 9)
        rows = []
        for b in range(10):
            sel = index == b
            if sel.any():
                rows.append({"bin": [round(edges[b], 1), round(edges[b + 1], 1)], "voxels": int(sel.sum()),
                             "stated": round(float(stated[sel].mean()), 4), "observed": round(float(1 - wrong[sel].mean()), 4)})
        ece = sum(r["voxels"] * abs(r["stated"] - r["observed"]) for r in rows) / max(1, len(stated))
        table[label] = {"bins": rows, "expected_calibration_error": round(float(ece), 4)}
        ax.plot([r["stated"] for r in rows], [r["observed"] for r in rows], marker="o", label=f"{label}, ECE {ece:.3f}")
    ax.set_xlabel("stated confidence")
    ax.set_ylabel("observed accuracy (label equals the expert's)")
    ax.set_title("Voxels within 10 mm of tumour, test patients")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return table


def summarise(cases: dict[str, dict]) -> dict:
    """Means over cases: AUROC per estimator, Dice per label source, range coverage and width."""
    names = list(cases)
    out: dict = {"auroc_mean": {}, "dice_3d_mean": {}, "ranges": {}}
    for key in cases[names[0]]["auroc"]:
        out["auroc_mean"][key] = round(float(np.nanmean([cases[c]["auroc"][key] for c in names])), 4)
    for key in cases[names[0]]["dice_3d"]:
        per = {r: float(np.mean([cases[c]["dice_3d"][key][r] for c in names])) for r in ("WT", "TC", "ET")}
        out["dice_3d_mean"][key] = {**{r: round(v, 4) for r, v in per.items()}, "mean": round(float(np.mean(list(per.values()))), 4)}
    for key in cases[names[0]]["ranges"]:
        covered, widths = {}, {}
        for region in REGION_ORDER:
            inside = [cases[c]["ranges"][key][region][0] <= cases[c]["expert_ml"][region] <= cases[c]["ranges"][key][region][1]
                      for c in names]
            covered[region] = f"{sum(inside)}/{len(inside)}"
            widths[region] = round(float(np.median([cases[c]["ranges"][key][region][1] - cases[c]["ranges"][key][region][0]
                                                    for c in names])), 2)
        total = sum(int(v.split("/")[0]) for v in covered.values())
        out["ranges"][key] = {"expert_inside": covered, "expert_inside_all_regions": f"{total}/{len(names) * len(REGION_ORDER)}",
                              "median_width_ml": widths}
    return out


def command_cost(folder: Path, args, repeats: int) -> dict:
    """Seconds of the plain command and of ``--confidence`` on one case: in this (warm) process
    through ``cli.main``, as a running Slicer worker runs them (best of ``repeats`` after one
    warm-up), and as fresh processes (best of ``repeats``)."""
    import contextlib
    import io

    from KANTumorSegLib.cli import main as command

    modes = {"plain": [], "confidence": ["--confidence"]}
    times: dict[str, dict[str, list[float]]] = {"warm": {m: [] for m in modes}, "fresh process": {m: [] for m in modes}}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, extra in modes.items():
            argv = ["segment", str(folder), "-o", tmp, "--overwrite", "--progress", "none", "--device", args.device,
                    "--model", str(args.model), *extra]
            for run in range(repeats + 1):
                start = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    code = command(argv)
                if code != 0:
                    raise SystemExit(f"kantumorseg {' '.join(argv)} failed with exit code {code}")
                if run:  # the first run warms up
                    times["warm"][mode].append(round(time.perf_counter() - start, 2))
            for _ in range(repeats):
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "KANTumorSegLib", *argv], check=True, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                times["fresh process"][mode].append(round(time.perf_counter() - start, 2))
    best = {kind: {mode: min(v) for mode, v in per.items()} for kind, per in times.items()}
    return {"seconds": times, "best": best,
            "confidence_over_plain": {kind: round(b["confidence"] / b["plain"], 2) for kind, b in best.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for confidence_eval.json and reliability.png")
    parser.add_argument("--model", type=Path, default=REPO / "Resources" / "Models" / "kanunet2d_brats.safetensors")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--cases", nargs="*", default=list(TEST_CASES), help="test cases (ids of TEST_CASES or CALIBRATION_CASES)")
    parser.add_argument("--calibration", action="store_true",
                        help="first evaluate the calibration cases (reported apart) and fit the Platt scaling on them")
    parser.add_argument("--calibration-cases", nargs="*", default=list(CALIBRATION_CASES),
                        help="which calibration cases (default: all of CALIBRATION_CASES)")
    parser.add_argument("--cost-cases", nargs="*", default=["BraTS20_Training_001", "BraTS2021_00000"],
                        help="cases whose plain and --confidence commands are timed (none: skip)")
    parser.add_argument("--cost-repeats", type=int, default=1)
    parser.add_argument("--cache", type=Path, help="folder keeping each case's passes' figures (reused when present)")
    parser.add_argument("--members", type=Path, nargs="*", default=[],
                        help="ensemble members' weights (each with its card) to evaluate beside the model (issue 19)")
    parser.add_argument("--ship-members", action="store_true",
                        help="fit the calibration and report 'as written' for the 8 passes + --members combination")
    args = parser.parse_args(argv)
    import torch

    from KANTumorSegLib.weights import read_card

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folders = {**TEST_CASES, **CALIBRATION_CASES}
    if not SAMPLES.is_dir():
        raise SystemExit(f"The BraTS samples are not at {SAMPLES}; set KANTUMORSEG_SAMPLES to their folder.")
    args.out.mkdir(parents=True, exist_ok=True)
    card = read_card(args.model)
    report: dict = {
        "command": "Testing/benchmarks/confidence_eval.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": {"file": str(args.model), "name": card.get("name", ""), "sha256": card["sha256"]},
        "members": [{"file": str(m), "name": c.get("name", ""), "sha256": c["sha256"]}
                    for m in args.members for c in (read_card(m),)],
        "device": args.device, "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "shipped": {"passes": conf.DEFAULT_PASSES, "labels_from_passes": conf.LABELS_FROM_PASSES, "range_delta": conf.RANGE_DELTA},
        "near_mm": NEAR_MM,
    }
    library = conf.calibration_for(card)
    report["calibration_in_library"] = list(library)
    sets = {"calibration": args.calibration_cases} if args.calibration else {}
    sets["test"] = args.cases
    fitted = None
    for set_name, names in sets.items():
        if not names:  # --cases with no case: the cost alone
            continue
        cases, arrays = {}, {}
        for name in names:
            print(f"{set_name}: {name} ...", file=sys.stderr, flush=True)
            cases[name], arrays[name] = cached_case(name, SAMPLES / folders[name], args, card["sha256"])
        if set_name == "calibration":
            fitted = fit_platt([arrays[n]["raw"] for n in names], [arrays[n]["wrong"] for n in names])
            report["calibration_fitted"] = {"a": round(fitted[0], 4), "b": round(fitted[1], 4),
                                            "to_ship": f'confidence.CALIBRATIONS["{card["sha256"]}"] = ({fitted[0]:.4f}, {fitted[1]:.4f})'}
        for name in names:
            a = arrays[name]
            for label, calibration in (("as written", library), ("as written, calibration fitted here", fitted)):
                if calibration is not None:
                    cases[name]["auroc"][label] = auroc(-as_written(a["raw"], calibration), a["wrong"])
            print(f"  {name}: AUROC as written {cases[name]['auroc']['as written']:.3f}, "
                  f"baseline {cases[name]['auroc']['margin, 1 passes averaged']:.3f}",
                  file=sys.stderr, flush=True)
        report[set_name] = {"cases": cases, "summary": summarise(cases)}
        if set_name == "test":
            curves = {"as written": (library, "raw"), "one-pass margin (baseline)": (None, "baseline")}
            if fitted is not None:
                curves["calibration fitted on the calibration cases"] = (fitted, "raw")
            report["reliability"] = reliability(
                {label: (np.concatenate([as_written(arrays[n][key], c) if c else arrays[n][key] for n in names]),
                         np.concatenate([arrays[n]["wrong" if key == "raw" else "baseline_wrong"] for n in names]))
                 for label, (c, key) in curves.items()}, args.out / "reliability.png")
    if args.cost_cases:
        report["cost"] = {name: command_cost(SAMPLES / folders[name], args, args.cost_repeats) for name in args.cost_cases}
    (args.out / "confidence_eval.json").write_text(json.dumps(report, indent=1) + "\n")
    summary = report.get("test", {}).get("summary", {})
    print(json.dumps({"auroc_mean": summary.get("auroc_mean"), "dice_3d_mean": summary.get("dice_3d_mean"),
                      "ranges": summary.get("ranges"), "calibration_fitted": report.get("calibration_fitted"),
                      "cost": report.get("cost")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
