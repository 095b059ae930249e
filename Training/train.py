"""The training loop: the study's recipe on CPU, one CUDA GPU (bf16 autocast) or several
GPUs through torchrun and DistributedDataParallel.

A run directory holds config.yaml, split.json, log.csv (one row per epoch), last.pt
(resumable), best.pt (best validation mean Dice) and results.json (validation and test).
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import yaml

from .data import SliceSet, load_case, load_hdf5, make_split, pick_patients, save_split, select
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


class Augmenter:
    """The study's augmentation on the device: random 90-degree rotations and random
    shifts (MONAI RandRotate90d, RandAffined translation with nearest sampling, so a shift
    moves pixels without blurring them)."""

    def __init__(self, cfg: dict, seed: int) -> None:
        from monai.transforms import Compose, RandAffined, RandRotate90d

        if cfg["flip_prob"] or cfg["gamma_prob"]:
            raise ValueError("train.flip_prob and train.gamma_prob need train.augment: tensor.")
        shift = cfg["shift_pixels"]
        self.transform = Compose([
            RandRotate90d(keys=("image", "label"), prob=cfg["rot90_prob"], max_k=3, spatial_axes=(0, 1)),
            RandAffined(keys=("image", "label"), prob=cfg["shift_prob"], translate_range=(shift, shift),
                        mode="nearest", padding_mode=("border", "zeros")),
        ])
        self.transform.set_random_state(seed)

    def __call__(self, images, labels):
        import torch

        out_x, out_y = [], []
        for image, label in zip(images, labels):
            sample = self.transform({"image": image, "label": label[None].float()})
            out_x.append(torch.as_tensor(sample["image"]))
            out_y.append(torch.as_tensor(sample["label"])[0])
        return torch.stack(out_x), torch.stack(out_y).round().long()


class TensorAugmenter:
    """The same two augmentations as plain tensor operations on the device: k x 90-degree
    rotation (k in 1..3) and an integer shift, each with its probability. MONAI's form builds
    and resamples an affine grid per slice, CPU work on every step of a launch-bound run; the
    experiment used this form (train.augment: tensor) to cut it (not timed separately);
    train.augment: monai keeps the MONAI transforms.

    Two more, off in the study's recipe (probability 0) and tried for the shipped model:
    a left-right flip (with the rotations, every symmetry of the square), and a random
    contrast change per channel, u -> u**g on the [0, 1] intensity u with g drawn from
    ``gamma_range``: a scanner or a BraTS release with another intensity profile changes
    the contrast that the per-slice min-max leaves."""

    def __init__(self, cfg: dict, seed: int) -> None:
        import torch

        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(seed)

    def _draw(self, prob: float) -> bool:
        import torch

        return bool(torch.rand(1, generator=self.generator) < prob)

    def __call__(self, images, labels):
        import torch

        out_x, out_y = [], []
        shift = self.cfg["shift_pixels"]
        for image, label in zip(images, labels):
            if self._draw(self.cfg["rot90_prob"]):
                k = int(torch.randint(1, 4, (1,), generator=self.generator))
                image, label = torch.rot90(image, k, (-2, -1)), torch.rot90(label, k, (-2, -1))
            if self._draw(self.cfg["shift_prob"]):
                dx, dy = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=self.generator))
                image, label = shift_2d(image, dx, dy, -1.0), shift_2d(label, dx, dy, 0)
            if self._draw(self.cfg["flip_prob"]):
                image, label = torch.flip(image, (-2,)), torch.flip(label, (-2,))
            if self._draw(self.cfg["gamma_prob"]):
                low, high = self.cfg["gamma_range"]
                gamma = low + (high - low) * torch.rand(image.shape[0], 1, 1, generator=self.generator)
                image = 2.0 * ((image + 1.0) / 2.0).clamp(min=0.0).pow(gamma.to(image.device, image.dtype)) - 1.0
            out_x.append(image)
            out_y.append(label)
        return torch.stack(out_x), torch.stack(out_y)


def shift_2d(tensor, dx: int, dy: int, fill):
    """Move the last two axes by (dx, dy) pixels, filling what enters with ``fill``
    (-1 is the preprocessed background, 0 the background label)."""
    import torch

    out = torch.roll(tensor, (dx, dy), (-2, -1))
    if dx > 0:
        out[..., :dx, :] = fill
    elif dx < 0:
        out[..., dx:, :] = fill
    if dy > 0:
        out[..., :, :dy] = fill
    elif dy < 0:
        out[..., :, dy:] = fill
    return out


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
    """(train, validation) SliceSets and the split, saved as split.json beside the run."""
    from KANTumorSegLib.preprocessing import PreprocessingConfig

    data = config["data"]
    pre = PreprocessingConfig.from_dict(config["preprocessing"])
    root, cache = Path(data["root"]), Path(data["cache"])
    split_seed = config["seed"] if data["split_seed"] is None else data["split_seed"]
    hdf5 = load_hdf5(root, cache, pre)
    case = load_case(root, cache, data["train_case"], pre) if data["train_case"] else None
    if data["pool"] == "grid":
        extra = case.subset(np.nonzero(case.has_tumour)[0]) if case is not None else None
        split = make_split(hdf5, extra, data["n_train"], data["n_val"], split_seed)
    elif data["pool"] == "all":
        import random

        val_patients = pick_patients(hdf5.patients, data["n_val"], random.Random(split_seed))
        keys = [[str(s.sources[i]), str(s.patients[i]), int(s.z[i])] for s in ([hdf5] + ([case] if case else []))
                for i in range(len(s))]
        split = {"seed": split_seed, "val": [k for k in keys if k[0] == "hdf5" and k[1] in val_patients],
                 "train": [k for k in keys if not (k[0] == "hdf5" and k[1] in val_patients)]}
        split["n_train"], split["n_val"] = len(split["train"]), len(split["val"])
    else:
        raise ValueError(f"data.pool must be 'grid' or 'all', not {data['pool']!r}")
    sets = [hdf5] + ([case] if case is not None else [])
    if run_dir is not None:
        save_split(split, run_dir / "split.json")
    return select(split["train"], sets), select(split["val"], sets), split


def evaluate_test_cases(model, config: dict, device) -> dict:
    """Full-volume inference (the library's segment_volume) on each test case: per-case 3D
    metrics, slice metrics over its tumour slices, and false-positive mL on its brain
    slices without tumour."""
    from KANTumorSegLib.inference import SlicePredictor, segment_volume
    from KANTumorSegLib.preprocessing import PreprocessingConfig

    from .data import CASE_FOLDERS, read_nifti_case, voxel_ml
    from .metrics import per_slice_mean_dice, score_test_case

    pre = PreprocessingConfig.from_dict(config["preprocessing"])
    predictor = SlicePredictor(model, device, batch_size=32,
                               precision="bfloat16" if config["train"]["amp"] and device.type == "cuda" else "float32")
    root = Path(config["data"]["root"])
    out: dict = {"cases": {}}
    slice_preds, slice_truths = [], []
    for case in config["data"]["test_cases"]:
        folder = root / CASE_FOLDERS[case]
        volume, truth = read_nifti_case(folder)
        figures, preds, truths = score_test_case(segment_volume(volume, predictor, pre), truth, volume, voxel_ml(folder))
        slice_preds.append(preds)
        slice_truths.append(truths)
        out["cases"][case] = {**figures, "slice_dice_mean": per_slice_mean_dice(preds, truths).round(5).tolist()}
    preds, truths = np.concatenate(slice_preds), np.concatenate(slice_truths)
    out["slices"] = mean_metrics(preds, truths)
    out["n_slices"] = len(preds)
    out["volume_3d_mean"] = {name: float(np.mean([c["volume_3d"][name] for c in out["cases"].values()]))
                             for name in METRIC_NAMES}
    out["false_positive_ml_total"] = float(sum(c["false_positive_ml_tumour_free_slices"] for c in out["cases"].values()))
    return out


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

    model = build_model(config["model"]).to(device)
    head = model.config.head
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
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
    fields = ["epoch", "lr", "train_loss", "seconds", *[f"val_{m}" for m in METRIC_NAMES]]
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
    for epoch in bar:
        started = time.perf_counter()
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
        scheduler.step()
        train_loss = float(torch.stack(losses).mean()) if losses else float("nan")
        if world > 1:
            value = torch.tensor([train_loss], device=device)
            torch.distributed.all_reduce(value)
            train_loss = float(value) / world
        epochs_run = epoch + 1
        # A shared wall-clock budget (one device call): stop before the next epoch would
        # overrun it; results.json records how many epochs ran. Every rank must agree.
        stop = torch.tensor([bool(cfg["deadline_unix"]) and time.time() + 1.5 * (time.perf_counter() - started)
                             > cfg["deadline_unix"]], device=device, dtype=torch.float32)
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


def validate_and_save(model, optimizer, scheduler, val_set: SliceSet, device, cfg: dict, run_dir: Path, epoch: int,
                      lr: float, train_loss: float, started: float, bar, state: dict, checkpoint: bool = False) -> None:
    """Score the epoch on validation, log it, keep the best and the resumable checkpoint: every
    ``checkpoint_every`` epochs, and at a deadline stop (``checkpoint``), so that a resumed run
    continues from the last epoch logged instead of repeating epochs and their log rows."""
    import torch

    log_path, last = run_dir / "log.csv", run_dir / "last.pt"
    preds = predict_labels(model, val_set.inputs, device, cfg["eval_batch"], cfg["amp"])
    val = mean_metrics(preds, val_set.labels)
    seconds = time.perf_counter() - started
    with open(log_path, "a", newline="") as stream:
        csv.writer(stream).writerow([epoch, lr, round(train_loss, 6), round(seconds, 3),
                                     *[round(val[m], 6) for m in METRIC_NAMES]])
    if val["dice_mean"] > state["best"]:
        state["best"], state["best_epoch"] = val["dice_mean"], epoch
        torch.save(model.state_dict(), run_dir / "best.pt")
    if checkpoint or (epoch + 1) % cfg["checkpoint_every"] == 0:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "epoch": epoch, **state}, last)
    bar.set_postfix(loss=f"{train_loss:.3f}", val_dice=f"{val['dice_mean']:.3f}", best=f"{state['best']:.3f}")



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
        "validation": mean_metrics(predict_labels(model, val_set.inputs, device, cfg["eval_batch"], cfg["amp"]), val_set.labels),
        "device": str(device),
    }
    if cfg["test"]:
        results["test"] = evaluate_test_cases(model, config, device)
    (run_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
