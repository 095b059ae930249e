"""The training loop: the study's recipe on CPU, one CUDA GPU (bf16 autocast) or several
GPUs through torchrun and DistributedDataParallel.

A run directory holds config.yaml, split.json, log.csv (one row per epoch), last.pt
(resumable), best.pt (best validation mean Dice) and results.json (validation and test).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import yaml

from .augment import Augmenter, TensorAugmenter
from .data import SliceSet, load_case, load_hdf5, make_split, patient_group, pick_patients, save_split, select
from .metrics import METRIC_NAMES, mean_metrics
from .models import build_model, count_parameters
from .train_step import TrainStep

LABEL_INDEX = np.array([0, 1, 2, 0, 3], dtype=np.int64)
"""BraTS label 0/1/2/4 -> channel of the classes head (background, NCR, ED, ET)."""


def setup_distributed():
    """(rank, world size, device) from torchrun's environment, or a single process."""
    import torch

    from KANTumorSegLib.inference import choose_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl")
        return rank, world, torch.device("cuda", local)
    torch.distributed.init_process_group("gloo")
    return rank, world, choose_device("cpu")


def targets(labels, head: str):
    """(B, H, W) int labels 0/1/2/4 -> (B, C, H, W) float one-hot targets of the head."""
    import torch

    if head == "classes":
        index = torch.as_tensor(LABEL_INDEX, device=labels.device)[labels.long()]
        return torch.nn.functional.one_hot(index, 4).permute(0, 3, 1, 2).float()
    wt = labels > 0
    tc = (labels == 1) | (labels == 4)
    et = labels == 4
    return torch.stack([wt, tc, et], dim=1).float()


def predict_labels(model, inputs: np.ndarray, device, batch: int, amp: bool) -> np.ndarray:
    """(N, 4, S, S) inputs -> (N, S, S) labels 0/1/2/4 through the library's decoder.

    Not the library's SlicePredictor: that converts the module to channels-last, which would
    change the layout of the network being trained (and of its DDP buckets) between epochs."""
    import torch

    from KANTumorSegLib.unet import decode_logits

    model.eval()
    out = []
    dtype = torch.bfloat16 if amp and device.type == "cuda" else torch.float32
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for start in range(0, len(inputs), batch):
            x = torch.from_numpy(inputs[start:start + batch].astype(np.float32)).to(device)
            out.append(decode_logits(model(x).float(), model.config.head).cpu().numpy())
    return np.concatenate(out)


def load_datasets(config: dict, run_dir: Path | None):
    """(train, validation) SliceSets and the split, saved as split.json beside the run.

    Validation is by patient from both pools: ``n_val`` slices of whole HDF5 patients, plus
    every brain slice of the ``val_cases`` (pool all). No test case may train or validate."""
    import random

    from KANTumorSegLib.preprocessing import PreprocessingConfig

    data = config["data"]
    pre = PreprocessingConfig.from_dict(config["preprocessing"])
    root, cache = Path(data["root"]), Path(data["cache"])
    split_seed = config["seed"] if data["split_seed"] is None else data["split_seed"]
    leaked = set(data["test_cases"]) & (set(data["train_cases"]) | set(data["val_cases"]))
    if leaked:
        raise ValueError(f"test cases {sorted(leaked)} are also in data.train_cases or data.val_cases")
    if set(data["val_cases"]) - set(data["train_cases"]):
        raise ValueError(f"data.val_cases {sorted(set(data['val_cases']) - set(data['train_cases']))} are not in data.train_cases")
    hdf5 = load_hdf5(root, cache, pre)
    # The grid pool reaches for the 3D cases only when the HDF5 slices run out (n = 150): a run
    # of 100 HDF5 slices then holds 0.1 GB instead of 1 GB, which matters with many runs at once.
    needs_cases = data["pool"] == "all" or data["n_train"] + data["n_val"] > len(hdf5)
    cases = [load_case(root, cache, case, pre) for case in data["train_cases"]] if needs_cases else []
    if data["pool"] == "grid":
        tumour = [c.subset(np.nonzero(c.has_tumour)[0]) for c in cases]
        extra = SliceSet.concat(tumour) if tumour else None
        split = make_split(hdf5, extra, data["n_train"], data["n_val"], split_seed)
    elif data["pool"] == "all":
        # Split by patient group: a 3D case and its own HDF5 slices (data.SAME_PATIENT) fall on
        # one side. HDF5 validation patients are drawn outside the 3D cases' groups, so the 3D
        # cases keep the side their config gives them.
        case_groups = {patient_group(c) for c in data["train_cases"]}
        eligible = np.array([p for p in hdf5.patients if patient_group(str(p)) not in case_groups])
        val_groups = {patient_group(str(p)) for p in pick_patients(eligible, data["n_val"], random.Random(split_seed))}
        val_groups |= {patient_group(c) for c in data["val_cases"]}
        keys = [[str(s.sources[i]), str(s.patients[i]), int(s.z[i])] for s in [hdf5, *cases] for i in range(len(s))]
        # Without use_hdf5 the HDF5 slices still validate with their patient's volume; they never train.
        train_keys = [k for k in keys if (data["use_hdf5"] or k[0] != "hdf5")
                      and (data["val_in_train"] or patient_group(k[1]) not in val_groups)]
        if data["n_patients"] is not None:
            groups = sorted({patient_group(k[1]) for k in train_keys})
            random.Random(split_seed + 1).shuffle(groups)
            kept = set(groups[: int(data["n_patients"])])
            train_keys = [k for k in train_keys if patient_group(k[1]) in kept]
        split = {"seed": split_seed, "val": [k for k in keys if patient_group(k[1]) in val_groups], "train": train_keys}
        split["n_train"], split["n_val"] = len(split["train"]), len(split["val"])
        split["n_train_patients"] = len({patient_group(k[1]) for k in train_keys})
    else:
        raise ValueError(f"data.pool must be 'grid' or 'all', not {data['pool']!r}")
    if run_dir is not None:
        save_split(split, run_dir / "split.json")
    return select(split["train"], [hdf5, *cases]), select(split["val"], [hdf5, *cases]), split


def evaluate_test_cases(model, config: dict, device) -> dict:
    """Every test case's cached brain slices through the network, pasted back into the
    240 x 240 x 155 volume as the library does: per-case 3D metrics (before and after the
    configured post-processing), slice metrics over its tumour slices and false-positive mL
    on its brain slices without tumour."""
    from KANTumorSegLib.postprocess import PostprocessConfig, postprocess
    from KANTumorSegLib.preprocessing import PreprocessingConfig

    from .data import case_volume
    from .metrics import case_metrics, per_slice_mean_dice, score_test_case

    pre = PreprocessingConfig.from_dict(config["preprocessing"])
    post = PostprocessConfig.from_dict(config["postprocessing"])
    root, cache = Path(config["data"]["root"]), Path(config["data"]["cache"])
    out: dict = {"cases": {}}
    slice_preds, slice_truths = [], []
    for case in config["data"]["test_cases"]:
        cached = load_case(root, cache, case, pre)
        truth = case_volume(cached)
        predicted = predict_labels(model, cached.inputs, device, config["train"]["eval_batch"], config["train"]["amp"])
        raw = case_volume(dataclasses.replace(cached, labels=predicted))  # no copy of the inputs
        pred = postprocess(raw, VOXEL_ML, post)
        brain = np.zeros(truth.shape[-1], dtype=bool)
        brain[cached.z.astype(int)] = True
        figures, preds, truths = score_test_case(pred, truth, brain, VOXEL_ML)
        figures["volume_3d_before_postprocessing"] = case_metrics(raw, truth)
        slice_preds.append(preds)
        slice_truths.append(truths)
        out["cases"][case] = {**figures, "slice_dice_mean": per_slice_mean_dice(preds, truths).round(5).tolist()}
    preds, truths = np.concatenate(slice_preds), np.concatenate(slice_truths)
    out["slices"] = mean_metrics(preds, truths)
    out["n_slices"] = len(preds)
    out["volume_3d_mean"] = {name: float(np.mean([c["volume_3d"][name] for c in out["cases"].values()]))
                             for name in METRIC_NAMES}
    out["case_slice_dice_mean"] = float(np.mean([c["tumour_slices"]["dice_mean"] for c in out["cases"].values()]))
    out["false_positive_ml_total"] = float(sum(c["false_positive_ml_tumour_free_slices"] for c in out["cases"].values()))
    return out


VOXEL_ML = 0.001
"""Every shared BraTS volume is 1 mm isotropic (checked when its cache is built)."""


def train(config: dict) -> Path:
    """Run (or resume) one training run; returns its directory."""
    import torch
    from monai.losses import DiceLoss
    from tqdm import tqdm

    from KANTumorSegLib.inference import choose_device

    rank, world, ddp_device = setup_distributed()
    cfg = config["train"]
    device = ddp_device or choose_device(cfg["device"])
    run_dir = Path(config["output"]) / config["name"]
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    torch.manual_seed(config["seed"])
    # Every batch has the same shape, so cuDNN's autotuned kernels pay off at once.
    torch.backends.cudnn.benchmark = device.type == "cuda"
    train_set, val_set, split = load_datasets(config, run_dir if rank == 0 else None)
    if cfg["select_metric"] not in SELECT_METRICS:
        raise ValueError(f"train.select_metric must be one of {sorted(SELECT_METRICS)}, not {cfg['select_metric']!r}")
    if cfg["select_metric"] == "case3d" and not (val_set.sources == "nifti").any():
        raise ValueError("train.select_metric case3d needs 3D validation patients (data.val_cases)")

    model = build_model(config["model"]).to(device)
    head = model.config.head
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg["compile"] and device.type == "cuda":
        net = torch.compile(net)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=cfg["t0_epochs"], eta_min=cfg["eta_min"])
    # batch=True pools each channel's Dice over the batch: per-slice Dice of a channel that is
    # empty in a slice (tumour-free slices, slices without ET) is ~1 whatever the network does,
    # which stalled the first shipped-model rounds at a training loss of about 0.55.
    dice_loss = DiceLoss(sigmoid=True, batch=cfg["dice_batch"])
    bce_loss = torch.nn.BCEWithLogitsLoss()
    amp_dtype = torch.bfloat16 if cfg["amp"] and device.type == "cuda" else None
    step = TrainStep(net, optimizer, lambda logits, target: cfg["bce_weight"] * bce_loss(logits, target)
                     + dice_loss(logits, target), amp_dtype)

    state = {"best": -1.0, "best_epoch": -1}
    start_epoch = 0
    last = run_dir / "last.pt"
    if cfg["resume"] and last.exists():
        saved = torch.load(last, map_location=device, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        start_epoch = saved["epoch"] + 1
        state = {"best": saved["best"], "best_epoch": saved["best_epoch"]}
    epochs_run = start_epoch

    x_all = torch.from_numpy(train_set.inputs.astype(np.float32)).to(device)
    y_all = torch.from_numpy(train_set.labels.astype(np.int64)).to(device)
    log_path = run_dir / "log.csv"
    fields = ["epoch", "lr", "train_loss", "seconds", *[f"val_{m}" for m in VAL_NAMES]]
    if rank == 0:
        # A run stopped between checkpoints (killed, not at a deadline) logged epochs that it
        # now runs again from last.pt: keep only the rows before the epoch it resumes from.
        kept = []
        if start_epoch > 0 and log_path.exists():
            with open(log_path, newline="") as stream:
                kept = [row for row in list(csv.reader(stream))[1:] if int(row[0]) < start_epoch]
        with open(log_path, "w", newline="") as stream:
            csv.writer(stream).writerows([fields, *kept])
    bar = tqdm(range(start_epoch, cfg["epochs"]), desc=config["name"], disable=rank != 0 or not cfg["progress"],
               initial=start_epoch, total=cfg["epochs"])
    train_started = time.perf_counter()
    for epoch in bar:
        started = time.perf_counter()
        if cfg["budget_s"]:
            for group in optimizer.param_groups:
                group["lr"] = budget_learning_rate(cfg, started - train_started)
        # Seeding per epoch makes a resumed run draw the same batches and augmentations.
        generator = torch.Generator().manual_seed(config["seed"] * 100003 + epoch)
        augment = (Augmenter if cfg["augment"] == "monai" else TensorAugmenter)(cfg, config["seed"] * 100003 + epoch)
        order = torch.randperm(len(train_set), generator=generator)[rank::world]
        net.train()
        losses = []
        for start in range(0, len(order) - cfg["batch_size"] + 1, cfg["batch_size"]):
            index = order[start:start + cfg["batch_size"]].to(device)
            x, y = augment(x_all[index], y_all[index])
            losses.append(step(x, targets(y, head)))
        lr = optimizer.param_groups[0]["lr"]
        if not cfg["budget_s"]:
            scheduler.step()
        train_loss = float(torch.stack(losses).mean()) if losses else float("nan")
        if world > 1:
            value = torch.tensor([train_loss], device=device)
            torch.distributed.all_reduce(value)
            train_loss = float(value) / world
        epochs_run = epoch + 1
        # A shared wall-clock budget (one device call): stop before the next epoch would
        # overrun it; results.json records how many epochs ran. Every rank must agree.
        epoch_seconds = time.perf_counter() - started
        stop = torch.tensor([(bool(cfg["deadline_unix"]) and time.time() + 1.5 * epoch_seconds > cfg["deadline_unix"])
                             or (bool(cfg["budget_s"]) and time.perf_counter() - train_started + epoch_seconds > cfg["budget_s"])],
                            device=device, dtype=torch.float32)
        if world > 1:
            torch.distributed.all_reduce(stop)
        if rank == 0:
            validate_and_save(model, optimizer, scheduler, val_set, device, cfg, run_dir, epoch, lr, train_loss, started,
                              bar, state, checkpoint=float(stop) > 0)
        if float(stop) > 0:
            break
    if rank == 0:
        finish(model, config, run_dir, val_set, device, split, state["best_epoch"], epochs_run)
    if world > 1:
        torch.distributed.destroy_process_group()
    return run_dir


def budget_learning_rate(cfg: dict, elapsed: float) -> float:
    """The learning rate of a run with a time budget (train.budget_s): one cosine cycle from lr to
    eta_min over the budget's seconds, not over epochs. Runs that share one GPU change speed as
    the others start, compile and finish, so an epoch count fixed from an early epoch's speed
    ends the run at a deadline halfway down its schedule (seen: every run of the first retrain
    call stopped at lr 5e-4); by the clock, each run anneals whatever its speed."""
    fraction = min(1.0, elapsed / cfg["budget_s"])
    return cfg["eta_min"] + (cfg["lr"] - cfg["eta_min"]) * (1.0 + math.cos(math.pi * fraction)) / 2.0


def validate_and_save(model, optimizer, scheduler, val_set: SliceSet, device, cfg: dict, run_dir: Path, epoch: int,
                      lr: float, train_loss: float, started: float, bar, state: dict, checkpoint: bool = False) -> None:
    """Score the epoch on validation, log it, keep the best and the resumable checkpoint: every
    ``checkpoint_every`` epochs, and at a deadline stop (``checkpoint``), so that a resumed run
    continues from the last epoch logged instead of repeating epochs and their log rows."""
    import torch

    log_path, last = run_dir / "log.csv", run_dir / "last.pt"
    preds = predict_labels(model, val_set.inputs, device, cfg["eval_batch"], cfg["amp"])
    val = validation_metrics(preds, val_set)
    seconds = time.perf_counter() - started
    with open(log_path, "a", newline="") as stream:
        csv.writer(stream).writerow([epoch, lr, round(train_loss, 6), round(seconds, 3),
                                     *[round(val[m], 6) for m in VAL_NAMES]])
    if cfg["select"] not in ("best", "last"):
        raise ValueError(f"train.select must be 'best' or 'last', not {cfg['select']!r}")
    score = val[SELECT_METRICS[cfg["select_metric"]]]
    if score > state["best"] or cfg["select"] == "last":
        state["best"], state["best_epoch"] = score, epoch
        torch.save(model.state_dict(), run_dir / "best.pt")
    if checkpoint or (epoch + 1) % cfg["checkpoint_every"] == 0:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "epoch": epoch, **state}, last)
    bar.set_postfix(loss=f"{train_loss:.3f}", val_dice=f"{score:.3f}", best=f"{state['best']:.3f}")


VAL_NAMES = (*METRIC_NAMES, "case3d_dice_mean", "case3d_worst")
SELECT_METRICS = {"slice": "dice_mean", "case3d": "case3d_dice_mean"}
"""train.select_metric -> the validation figure that picks the epoch: the study's mean slice
Dice, or the mean over the 3D validation patients of each one's 3D Dice over WT/TC/ET (the
product's unit is a patient)."""


def validation_metrics(preds: np.ndarray, val_set: SliceSet) -> dict[str, float]:
    """The slice metrics of the validation set, plus each 3D validation patient's 3D mean Dice
    (its brain slices stacked: the crops hold every brain voxel, and slices without brain are
    empty in both) as their mean and the worst; NaN without 3D validation patients."""
    from .metrics import case_metrics

    out = mean_metrics(preds, val_set.labels)
    nifti = val_set.sources == "nifti"
    per_case = [case_metrics(preds[nifti & (val_set.patients == p)], val_set.labels[nifti & (val_set.patients == p)])["dice_mean"]
                for p in sorted(set(val_set.patients[nifti].tolist()))]
    out["case3d_dice_mean"] = float(np.mean(per_case)) if per_case else float("nan")
    out["case3d_worst"] = float(min(per_case)) if per_case else float("nan")
    return out



def finish(model, config: dict, run_dir: Path, val_set: SliceSet, device, split: dict, best_epoch: int,
           epochs_run: int) -> None:
    """Reload the best checkpoint, score it on validation and the test cases, write results.json."""
    import torch

    model.load_state_dict(torch.load(run_dir / "best.pt", map_location=device, weights_only=True))
    cfg = config["train"]
    results = {
        "name": config["name"],
        "best_epoch": best_epoch,
        "epochs_run": epochs_run,
        "epochs_planned": cfg["epochs"],
        "parameters": count_parameters(model),
        "n_train": split["n_train"],
        "n_val": split["n_val"],
        "validation": validation_metrics(predict_labels(model, val_set.inputs, device, cfg["eval_batch"], cfg["amp"]), val_set),
        "device": str(device),
    }
    if cfg["test"]:
        results["test"] = evaluate_test_cases(model, config, device)
    (run_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
