"""What the Slicer module's worker saves: the real command in fresh processes against requests
to one ``kantumorseg worker``, side by side in one run on one device.

Issue 5 wants the whole command under 1.5 s per case on an H200, and Slicer starts one run per
click. Without the worker every click is a fresh process (Python, the torch import and the GPU
start-up each time); with it (``slicer_support.Worker``, what the module uses) only the first
request pays them. Every run segments BraTS20_Training_001 into its own new folder, with the
module's own options (``--progress jsonl``); the time of a request is from sending it to the
worker's exit event, the time of a fresh command from start to exit.

    python3 Testing/benchmarks/worker_timing.py --device cuda        # the H200 (wheels as h200_bench.sh)
    .venv/bin/python Testing/benchmarks/worker_timing.py --device cpu --runs 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark import case_files  # noqa: E402

from KANTumorSegLib.slicer_support import Worker  # noqa: E402


def segment_argv(case: Path, out: Path, device: str) -> list[str]:
    return ["segment", str(case), "-o", str(out), "--device", device, "--progress", "jsonl"]


def fresh_command(argv: list[str]) -> tuple[float, int]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "KANTumorSegLib", *argv], cwd=REPO, capture_output=True)
    return time.perf_counter() - started, done.returncode


def worker_request(worker: Worker, argv: list[str]) -> tuple[float, int]:
    started = time.perf_counter()
    run = worker.submit(argv)
    for _ in run.stdout:
        pass
    return time.perf_counter() - started, run.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--runs", type=int, default=3, help="fresh commands, and worker requests, each")
    args = parser.parse_args(argv)
    case = case_files("BraTS20_Training_001")["t1ce"].parent
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        outputs = (Path(scratch) / f"out{i}" for i in range(1000))
        for i in range(args.runs):
            rows.append((f"fresh command {i + 1}", *fresh_command(segment_argv(case, next(outputs), args.device))))
        worker = Worker(sys.executable, dict(os.environ), REPO)
        started = time.perf_counter()
        worker.start()
        rows.append(("worker start (until it answers its ping)", time.perf_counter() - started, 0))
        try:
            for i in range(args.runs):
                rows.append((f"worker request {i + 1}", *worker_request(worker, segment_argv(case, next(outputs), args.device))))
        finally:
            worker.stop()
    print(f"# BraTS20_Training_001, --device {args.device}, {os.cpu_count()} CPUs")
    print("| run | seconds | exit |\n|---|---|---|")
    for name, seconds, code in rows:
        print(f"| {name} | {seconds:.2f} | {code} |")
    return 1 if any(code for _, _, code in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
