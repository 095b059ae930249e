"""The experiment grid: every cell x seed as its own training process, several at a time.

Each run is tiny (batch 2), far from filling an H200, so several run side by side on each
GPU; with ``gpus`` > 1 each new run goes to the GPU that has the fewest runs at the time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml


def expand(grid: dict) -> list[tuple[str, list[str]]]:
    """(run name, overrides) for every cell and seed of a grid file."""
    runs = []
    for cell in grid["cells"]:
        for seed in cell.get("seeds", grid["seeds"]):
            name = f"{cell['name']}_s{seed}"
            overrides = [f"name={name}", f"seed={seed}", f"output={grid['output']}"]
            # The grid's settings first, so a cell's own setting of the same key wins.
            overrides += [f"{k}={v}" for k, v in grid.get("set", {}).items()]
            overrides += [f"{k}={v}" for k, v in cell.get("set", {}).items()]
            runs.append((name, overrides))
    return runs


def run_grid(grid_file: Path, jobs: int, only: list[str], extra: list[str] = (), gpus: int = 0) -> None:
    grid = yaml.safe_load(Path(grid_file).read_text())
    runs = [r for r in expand(grid) if not only or r[0].rsplit("_s", 1)[0] in only]
    out = Path(grid["output"])
    out.mkdir(parents=True, exist_ok=True)
    pending, active, failed = list(runs), [], []
    started = time.perf_counter()
    # One thread each: many processes share the cores, and torch's default of one thread
    # per core in every process oversubscribes them.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    while pending or active:
        while pending and len(active) < jobs:
            name, overrides = pending.pop(0)
            log = open(out / f"{name}.log", "w")
            command = [sys.executable, "-m", "Training", "train", "--config", grid["base"],
                       "--override", "train.progress=false", *sum((["--override", o] for o in [*overrides, *extra]), [])]
            gpu = min(range(gpus), key=lambda g: sum(a[3] == g for a in active)) if gpus else None
            run_env = env if gpu is None else {**env, "CUDA_VISIBLE_DEVICES": str(gpu)}
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=run_env)
            active.append((name, process, log, gpu))
            # Staggered starts: a device machine whose memory grows on demand hung when a
            # dozen processes loaded their data sets at once.
            time.sleep(3)
        time.sleep(1)
        for item in list(active):
            name, process, log, _ = item
            if process.poll() is not None:
                log.close()
                active.remove(item)
                status = "ok" if process.returncode == 0 else f"FAILED ({process.returncode})"
                if process.returncode:
                    failed.append(name)
                print(f"[{time.perf_counter() - started:7.1f}s] {name} {status}; {len(pending)} pending, {len(active)} running",
                      flush=True)
    if failed:
        raise ValueError(f"{len(failed)} runs failed: {', '.join(failed)}")
