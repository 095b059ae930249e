"""A tiny real training run through the installed commands: the loss goes down, the run
resumes, and its export loads back into ``kantumorseg segment``."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import processes
import pytest

BIN = Path(sys.executable).parent
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "Training" / "configs" / "study.yaml"


def run(*args, timeout: float = 180) -> subprocess.CompletedProcess:
    return processes.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def tiny_overrides(samples: Path, tmp: Path, epochs: int) -> list[str]:
    settings = {
        "name": "tiny", "output": tmp / "runs", "data.root": samples, "data.cache": tmp / "cache",
        "data.n_train": 8, "data.n_val": 4, "data.train_cases": "[]", "model.base_width": 4,
        "train.epochs": epochs, "train.lr": 3.0e-3, "train.rot90_prob": 0, "train.shift_prob": 0,
        "train.test": "false", "train.progress": "false", "preprocessing.crop_size": 96,
        "train.checkpoint_every": 2,
    }
    return sum((["--override", f"{k}={v}"] for k, v in settings.items()), [])


@pytest.fixture(scope="module")
def tiny_run(brats_samples: Path, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("train")
    done = run(BIN / "kantumorseg-train", "--config", DEFAULT_CONFIG, *tiny_overrides(brats_samples, tmp, 2))
    assert done.returncode == 0, done.stderr
    return tmp


def read_log(run_dir: Path) -> list[dict]:
    with open(run_dir / "log.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def test_tiny_run_loss_goes_down_and_resumes(brats_samples: Path, tiny_run: Path):
    run_dir = tiny_run / "runs" / "tiny"
    for name in ("config.yaml", "split.json", "log.csv", "best.pt", "last.pt", "results.json"):
        assert (run_dir / name).exists(), name
    # Resume: ask for one more epoch; the run continues from last.pt instead of starting again
    # (a run started again would rewrite the first rows: their seconds and losses differ).
    before = read_log(run_dir)
    done = run(BIN / "kantumorseg-train", "--config", DEFAULT_CONFIG, *tiny_overrides(brats_samples, tiny_run, 3))
    assert done.returncode == 0, done.stderr
    log = read_log(run_dir)
    assert [int(row["epoch"]) for row in log] == [0, 1, 2] and log[:2] == before
    losses = [float(row["train_loss"]) for row in log]
    assert losses[-1] < losses[0]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs_run"] == 3 and 0.0 <= results["validation"]["dice_mean"] <= 1.0
    # Epoch 2 came after the last checkpoint (epoch 1, checkpoint_every 2), as when a process
    # is killed: the rerun runs epoch 2 again and its row replaces the first one.
    done = run(BIN / "kantumorseg-train", "--config", DEFAULT_CONFIG, *tiny_overrides(brats_samples, tiny_run, 3))
    assert done.returncode == 0, done.stderr
    assert [int(row["epoch"]) for row in read_log(run_dir)] == [0, 1, 2]
    split = json.loads((run_dir / "split.json").read_text())
    assert not {k[1] for k in split["val"]} & {k[1] for k in split["train"]}


def test_deadline_stop_resumes_from_the_last_logged_epoch(brats_samples: Path, tmp_path: Path):
    """A device call's deadline stops a run between checkpoints; the rerun (the next call)
    must continue after the last logged epoch, not repeat epochs since the last checkpoint."""
    overrides = tiny_overrides(brats_samples, tmp_path, 3)
    past = ["--override", "train.deadline_unix=1", "--override", "train.checkpoint_every=25"]
    done = run(BIN / "kantumorseg-train", "--config", DEFAULT_CONFIG, *overrides, *past)
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "runs" / "tiny"
    assert [int(row["epoch"]) for row in read_log(run_dir)] == [0]  # the deadline had passed: one epoch
    assert json.loads((run_dir / "results.json").read_text())["epochs_run"] == 1
    import torch

    saved = torch.load(run_dir / "last.pt", weights_only=True)  # written at the stop, not at epoch 25
    assert saved["epoch"] == 0
    first_row = read_log(run_dir)[0]
    done = run(BIN / "kantumorseg-train", "--config", DEFAULT_CONFIG, *overrides)
    assert done.returncode == 0, done.stderr
    log = read_log(run_dir)
    assert [int(row["epoch"]) for row in log] == [0, 1, 2] and log[0] == first_row  # epoch 0 not run again
    assert json.loads((run_dir / "results.json").read_text())["epochs_run"] == 3


def test_export_loads_into_segment_command(tiny_run: Path, small_case: Path, tmp_path: Path):
    weights = tmp_path / "model" / "tiny.safetensors"
    done = run(BIN / "kantumorseg-export", tiny_run / "runs" / "tiny", "-o", weights)
    assert done.returncode == 0, done.stderr
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["label_convention"] == "brats2020" and card["model"]["base_width"] == 4
    assert card["training_data"]["n_train"] == 8 and card["preprocessing"]["crop_size"] == 96
    done = run(BIN / "kantumorseg", "segment", small_case, "-o", tmp_path / "out", "--model", weights,
               "--device", "cpu", "--progress", "none")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "crop_seg.nii.gz").exists()


def test_bad_config_is_one_clear_sentence(tmp_path: Path):
    done = run(BIN / "kantumorseg-train", "--config", tmp_path / "missing.yaml")
    assert done.returncode == 2
    assert "missing.yaml does not exist" in done.stderr and "Traceback" not in done.stderr
    done = run(BIN / "kantumorseg-train", "--override", "train.nonsense=1")
    assert done.returncode == 2 and "unknown key 'train.nonsense'" in done.stderr
    done = run(BIN / "kantumorseg-train", "--override", "train.lr=fast")
    assert done.returncode == 2 and "train.lr must be a number, not 'fast'" in done.stderr
    done = run(BIN / "kantumorseg-export", tmp_path, "-o", tmp_path / "x.safetensors")
    assert done.returncode == 2 and "config.yaml is missing" in done.stderr
