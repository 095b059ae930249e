"""Tables and figures from finished runs: the numbers of docs/RESULTS.md.

``python -m Training report RUNS --tables T.md --figures docs/figures`` reads every
``RUNS/*/*/results.json`` and ``log.csv`` (run names ``<cell>_s<seed>``).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

REGIONS = ("WT", "TC", "ET")


def load_runs(root: Path) -> dict[str, list[dict]]:
    """cell name -> its runs (results.json, config.yaml and the log rows), seeds in order.

    A cell name found in two run folders (one config run again in a later round, e.g.
    final_round1 and final_round2) is another experiment, not another seed: every cell of
    such a folder is named ``<folder>/<cell>``.
    """
    import yaml

    found = []
    for results_file in sorted(root.glob("*/*/results.json")):
        run = json.loads(results_file.read_text())
        if "test" not in run:  # a timing run (train.test: false), not part of the tables
            continue
        with open(results_file.parent / "log.csv", newline="") as stream:
            run["log"] = list(csv.DictReader(stream))
        run["config"] = yaml.safe_load((results_file.parent / "config.yaml").read_text())
        found.append((results_file.parent.parent.name, run["name"].rsplit("_s", 1)[0], run))
    folders_of = defaultdict(set)
    for folder, cell, _ in found:
        folders_of[cell].add(folder)
    clashing = {folder for folder, cell, _ in found if len(folders_of[cell]) > 1}
    cells: dict[str, list[dict]] = defaultdict(list)
    for folder, cell, run in found:
        cells[f"{folder}/{cell}" if folder in clashing else cell].append(run)
    return dict(cells)


def mean_sd(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}" if len(values) > 1 else f"{values.mean():.3f}"


def cell_row(name: str, runs: list[dict]) -> list[str]:
    test = [r["test"] for r in runs]
    return [name, str(runs[0]["n_train"]), str(len(runs)), f"{np.mean([r['epochs_run'] for r in runs]):.0f}",
            mean_sd([r["validation"]["dice_mean"] for r in runs]),
            *[mean_sd([t["slices"][f"dice_{g}"] for t in test]) for g in REGIONS],
            mean_sd([t["slices"]["dice_mean"] for t in test]),
            mean_sd([t["volume_3d_mean"]["dice_mean"] for t in test]),
            mean_sd([t["false_positive_ml_total"] for t in test])]


def class_row(name: str, runs: list[dict]) -> list[str]:
    test = [r["test"]["slices"] for r in runs]
    return [name, str(runs[0]["n_train"]), *[mean_sd([t[k] for t in test]) for k in ("dice_NCR", "dice_ED", "dice_ET_class", "accuracy")]]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


PAIRED_CELLS = [(f"kan_n{n}", f"plain_n{n}") for n in (50, 100, 150)] + [
    (f"kan_postrelu_n{n}", reference) for n in (50, 100, 150) for reference in (f"plain_n{n}", f"kan_n{n}")]
"""(KAN cell, reference cell) pairs with the same n, seeds and splits (Training/configs/table1.yaml):
the study's KAN against plain Conv2d per n, and the fixed basis against plain Conv2d and the
study's layer."""


def paired_tests(cells: dict) -> list[list[str]]:
    """Each pair of PAIRED_CELLS present, over the seeds both cells ran (a seed one cell lacks,
    e.g. a run lost to a deadline, has no partner): Wilcoxon signed-rank over the test slices
    (each slice's mean Dice averaged over those seeds) and a paired t-test over the seeds."""
    from scipy.stats import ttest_rel, wilcoxon

    def slice_scores(runs: list[dict]) -> np.ndarray:
        per_run = [np.concatenate([c["slice_dice_mean"] for c in r["test"]["cases"].values()]) for r in runs]
        return np.mean(per_run, axis=0)

    def seed_scores(runs: list[dict]) -> list[float]:
        return [r["test"]["slices"]["dice_mean"] for r in runs]

    rows = []
    for kan_cell, reference_cell in PAIRED_CELLS:
        kan_seeds = {r["config"]["seed"]: r for r in cells.get(kan_cell, [])}
        reference_seeds = {r["config"]["seed"]: r for r in cells.get(reference_cell, [])}
        seeds = sorted(kan_seeds.keys() & reference_seeds.keys())
        if not seeds:
            continue
        kan, reference = [kan_seeds[s] for s in seeds], [reference_seeds[s] for s in seeds]
        a, b = slice_scores(kan), slice_scores(reference)
        w = wilcoxon(a, b)
        t = ttest_rel(seed_scores(kan), seed_scores(reference))
        rows.append([kan_cell, reference_cell, f"{a.mean():.3f}", f"{b.mean():.3f}", f"{a.mean() - b.mean():+.3f}",
                     str(len(a)), f"{w.pvalue:.2g}", f"{t.pvalue:.2g}"])
    return rows


def curves(runs: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Epochs and the seed-mean of a log column, over the epochs every seed reached."""
    length = min(len(r["log"]) for r in runs)
    values = np.array([[float(row[key]) for row in r["log"][:length]] for r in runs])
    return np.arange(length), values.mean(axis=0)


def three_panels(plt, path: Path, title: str, ylabel: str, panels: list[tuple[str, list[tuple]]]) -> None:
    """One row of panels sharing the y axis; each panel plots (label, colour, runs, log column)
    seed-mean curves against the epoch, skipping cells that have no runs."""
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 3.8), sharey=True)
    for ax, (panel_title, series) in zip(axes, panels):
        for label, colour, runs, key in series:
            if runs:
                x, y = curves(runs, key)
                ax.plot(x, y, colour, label=label)
        ax.set_title(panel_title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:  # a legend on every panel with curves: a cell may exist at one n only (kan_g2 at n = 100)
            ax.legend(fontsize=8)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def figures(cells: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    three_panels(plt, out / "fig4_mean_dice_per_epoch.png", "Fig. 4: validation mean Dice per epoch (mean of 3 seeds)",
                 "validation mean Dice (WT/TC/ET)",
                 [(f"n = {n}", [(arch.replace("_g2", ", 2 grids"), colour, cells.get(f"{arch}_n{n}"), "val_dice_mean")
                                for arch, colour in (("kan", "C0"), ("kan_g2", "C3"), ("plain", "C1"),
                                                     ("basicunet", "C2"))])
                  for n in (50, 100, 150)])
    three_panels(plt, out / "fig5_dice_per_region.png", "Fig. 5: KANU-Net validation Dice per region (mean of 3 seeds)",
                 "validation Dice",
                 [(region, [(f"KAN n={n}", colour, cells.get(f"kan_n{n}"), f"val_dice_{region}")
                            for n, colour in ((50, "C0"), (100, "C1"), (150, "C2"))])
                  for region in REGIONS])

    fig, ax = plt.subplots(figsize=(5.5, 5))
    markers = {"kan": "o", "plain": "s", "basicunet": "^"}
    for name, runs in sorted(cells.items()):
        arch = name.split("_")[0]
        x = [r["validation"]["dice_mean"] for r in runs]
        y = [r["test"]["slices"]["dice_mean"] for r in runs]
        ax.scatter(x, y, marker=markers.get(arch, "x"), label=name, s=25)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set_xlim(0.2, 0.7)
    ax.set_ylim(0.2, 0.7)
    ax.set_xlabel("validation mean Dice (HDF5 slices)")
    ax.set_ylabel("test mean slice Dice (2 unseen 3D cases)")
    ax.set_title("Fig. 6: validation against test, every run")
    ax.legend(fontsize=6, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "fig6_validation_vs_test.png", dpi=90)
    plt.close(fig)

    final_rounds_figure({name: runs for name, runs in cells.items() if name.startswith("final_round")}, out)


def final_rounds_figure(cells: dict, out: Path) -> None:
    """Fig. 7: training loss and validation mean Dice per epoch of the shipped model's final
    rounds: per-slice Dice loss (MONAI's default batch=False) against batch Dice."""
    if not cells:
        return
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, runs in sorted(cells.items()):
        train = runs[0]["config"]["train"]
        label = (f"{name.split('/')[0]}, width {runs[0]['config']['model']['base_width']}, "
                 f"{'batch' if train.get('dice_batch') else 'per-slice'} Dice, T_0 = {train['t0_epochs']}")
        line = None
        for ax, key in zip(axes, ("train_loss", "val_dice_mean")):
            x, y = curves(runs, key)
            line = ax.plot(x, y, lw=1, label=label, color=line[0].get_color() if line else None)
        best = runs[0]["best_epoch"]
        axes[1].plot(best, float(runs[0]["log"][best]["val_dice_mean"]), "o", color=line[0].get_color())
    axes[0].set_ylabel("training loss (0.2 BCE + Dice loss)")
    axes[1].set_ylabel("validation mean Dice (WT/TC/ET, 25 slices)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Fig. 7: shipped model's final rounds (dot: best checkpoint)")
    fig.tight_layout()
    fig.savefig(out / "fig7_final_rounds.png", dpi=90)
    plt.close(fig)


def equal_epoch_rows(cells: dict) -> list[list[str]]:
    """Best validation mean Dice within the first E epochs, E the fewest epochs any run of the
    table reached: a shared deadline gives slower networks fewer epochs, and this compares
    the cells at an equal count instead."""
    epochs = min(len(r["log"]) for runs in cells.values() for r in runs)
    return [[name, str(epochs), mean_sd([max(float(row["val_dice_mean"]) for row in r["log"][:epochs]) for r in runs])]
            for name, runs in sorted(cells.items())]


def write_report(runs_root: Path, figures_dir: Path | None, tables: Path | None) -> None:
    cells = load_runs(runs_root)
    header = ["cell", "n", "seeds", "epochs", "val mean", "test WT", "test TC", "test ET", "test mean (slices)",
              "3D mean (2 cases)", "FP mL (tumour-free slices)"]
    main = [cell_row(n, cells[n]) for n in sorted(cells)]
    per_class = [class_row(n, cells[n]) for n in sorted(cells)]
    text = "\n\n".join([
        markdown(header, main),
        markdown(["cell", "n", "NCR", "ED", "ET", "accuracy"], per_class),
        markdown(["KAN cell", "against", "KAN mean", "their mean", "difference", "test slices", "Wilcoxon p (slices)",
                  "paired t p (seeds)"],
                 paired_tests(cells)),
        markdown(["cell", "epochs", "best validation mean within them"], equal_epoch_rows(cells)),
    ])
    if tables is not None:
        tables.write_text(text + "\n")
    print(text)
    if figures_dir is not None:
        figures(cells, figures_dir)


def overlay_figure(model_path: Path, case_dir: Path, out: Path) -> None:
    """Fig. 3: ground truth, prediction and their difference on the slice of a test case
    with the most tumour, with the exported model the library loads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from KANTumorSegLib.inference import SlicePredictor, segment_volume
    from KANTumorSegLib.weights import load_model

    from .data import read_nifti_case

    model, _, preprocessing = load_model(model_path)
    volume, truth = read_nifti_case(case_dir)
    z = int((truth > 0).sum(axis=(0, 1)).argmax())
    pred = segment_volume(volume[..., z:z + 1], SlicePredictor(model, torch.device("cpu")), preprocessing)[..., 0]
    gt = truth[..., z]
    flair = volume[3, ..., z]
    base = (flair - flair.min()) / max(float(np.ptp(flair)), 1e-6)
    lut = {1: (1.0, 0.85, 0.2), 2: (0.2, 0.8, 0.2), 4: (0.9, 0.15, 0.15)}

    def overlay(labels):
        image = np.repeat(base[..., None], 3, axis=-1)
        for label, colour in lut.items():
            image[labels == label] = colour
        return image

    diff = np.repeat(base[..., None], 3, axis=-1) * 0.6
    diff[(pred > 0) & (gt == 0)] = (1.0, 0.2, 0.2)   # false positive
    diff[(pred == 0) & (gt > 0)] = (0.2, 0.4, 1.0)   # missed
    diff[(pred > 0) & (gt > 0) & (pred != gt)] = (1.0, 0.9, 0.2)  # tumour, wrong class
    fig, axes = plt.subplots(1, 3, figsize=(11, 4))
    # Model-grid arrays are (X to the left, Y to posterior): transpose to show them radiologically.
    for ax, image, title in zip(axes, (overlay(gt), overlay(pred), diff),
                                ("ground truth", "prediction (shipped model)", "difference: red FP, blue FN, yellow class")):
        ax.imshow(np.transpose(image, (1, 0, 2))[:, ::-1])
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"Fig. 3: {case_dir.name}, axial slice z={z} (NCR yellow, ED green, ET red)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
