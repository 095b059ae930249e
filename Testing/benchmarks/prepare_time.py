"""What ``--prepare`` adds to a case: the plain command and the prepared one in the same run.

A raw case is crafted from BraTS20_Training_001 (``Testing/crafted_raw.py``: each series moved and
resliced into 0.9 x 0.9 x 5.5 mm tilted slabs) in a temporary folder. Three commands run one after
the other, each a fresh process as a user runs it: the plain command on the BraTS case (155 slices
of 1 mm), then ``--prepare`` on the raw case, then the plain command on the raw case (its 33 thick
slices, the wrong way to segment it, for scale). Each stage's seconds come from the command's own
``--progress jsonl`` lines, time-stamped as they arrive; preparation is read, the three
registrations, resample and skull-strip (``prepare.PREPARE_STAGES``). Also prints the 1-minute load
average, as this 2-core machine is shared.

    .venv/bin/python Testing/benchmarks/prepare_time.py [--device cuda]

For a machine without the shared samples (the GPU machine), ``--craft DIR`` writes the raw case
(``DIR/raw``, 1.7 MB) and the BraTS case's four modalities (``DIR/brats``, 7.4 MB) and stops;
``--cases DIR`` then times from that folder (``Testing/benchmarks/prepare_gpu_bundle.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "Testing")]
SAMPLES = Path(os.environ.get("KANTUMORSEG_SAMPLES", REPO.parent / "shared" / "data" / "brats_samples"))
CASE = SAMPLES / "HunorLaczko_IPCV-TRDP_BraTS_2020/example/BraTS20_Training_001"
MODALITIES = ("t1", "t1ce", "t2", "flair")


def craft(folder: Path) -> tuple[Path, Path]:
    """The raw case crafted into ``folder/raw`` and the BraTS case's four modalities copied to
    ``folder/brats`` (no expert labels: nothing here scores); the two case folders."""
    import shutil

    from crafted_raw import craft_raw_case

    raw, brats = folder / "raw", folder / "brats"
    craft_raw_case(CASE, raw)
    (folder / "raw_seg_truth.nii.gz").unlink()
    brats.mkdir(parents=True, exist_ok=True)
    for m in MODALITIES:
        shutil.copyfile(CASE / f"{CASE.name}_{m}.nii.gz", brats / f"{CASE.name}_{m}.nii.gz")
    return brats, raw


def timed_run(args: list[str]) -> tuple[float, dict[str, float]]:
    """Wall seconds of one command and the seconds of each of its stages (first line to last)."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "KANTumorSegLib", "segment", *args, "--progress", "jsonl", "--overwrite"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    stages: dict[str, list[float]] = {}
    previous = start
    assert process.stdout is not None
    for line in process.stdout:
        now = time.perf_counter()
        stage = json.loads(line)["stage"]
        # A stage runs from the previous line (the end of the stage before it) to its last line.
        stages.setdefault(stage, [previous, now])[1] = now
        previous = now
    if process.wait() != 0:
        raise SystemExit(f"command failed: {process.stderr.read()}")
    return time.perf_counter() - start, {s: round(b - a, 1) for s, (a, b) in stages.items() if s != "done"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--craft", type=Path, metavar="DIR", help="write the two cases into DIR and stop")
    parser.add_argument("--cases", type=Path, metavar="DIR", help="time the cases --craft wrote into DIR")
    args = parser.parse_args()
    from KANTumorSegLib.prepare import PREPARE_STAGES

    if args.craft:
        craft(args.craft)
        print(f"wrote {args.craft}/raw and {args.craft}/brats")
        return
    with tempfile.TemporaryDirectory() as work:
        brats, raw = (args.cases / "brats", args.cases / "raw") if args.cases else craft(Path(work))
        common = ["--device", args.device]
        for name, command in (("plain, BraTS case", [str(brats), "-o", f"{work}/plain"]),
                              ("--prepare, raw case", [str(raw), "-o", f"{work}/prepared", "--prepare"]),
                              ("plain, raw case", [str(raw), "-o", f"{work}/raw_plain"])):
            load = os.getloadavg()[0]
            seconds, stages = timed_run(command + common)
            preparation = sum(stages.get(s, 0.0) for s in PREPARE_STAGES)
            print(f"{name:<20} {seconds:6.1f} s  read+register+resample+skull-strip {preparation:5.1f} s  stages {stages}  "
                  f"load {load:.1f}", flush=True)


if __name__ == "__main__":
    main()
