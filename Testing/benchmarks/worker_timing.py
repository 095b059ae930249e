"""What the Slicer module's worker and its warm-up save: fresh commands, a cold worker's first
request, and the first request after the module's background warm-up, side by side in one run
on one device, with how live the caller's (Slicer's main) thread stays during the warm-up.

Slicer starts one run per click. Without a worker every click is a fresh process (Python, the
torch import, the GPU start-up and the model load each time). A cold worker
(``slicer_process.Worker``) pays them on its first request. The module warms its worker when it
is entered (``slicer_process.BackgroundStart`` with ``warmup_request``: the worker starts and
segments a small synthetic phantom in a thread), so that the first click costs what later ones
do; issue 13's goal: under 2 s on a GPU once the warm-up has finished, the user interface live
during it. Every run segments BraTS20_Training_001 into its own new folder with the module's
options (``--progress jsonl``); a request's time is from sending it to the worker's exit event.

The caller's thread is measured as Slicer's main thread would run during the warm-up: a 10 ms
timer tick (what Qt's event loop does between events), recording the longest gap between ticks.

    python3 Testing/benchmarks/worker_timing.py --device cuda --runs 3      # a GPU (wheels as h200_bench.sh)
    .venv/bin/python Testing/benchmarks/worker_timing.py --device cpu --runs 2 [--case SMALL_CASE_DIR]
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

from KANTumorSegLib.slicer_process import BackgroundStart, Worker, warmup_request  # noqa: E402
from KANTumorSegLib.weights import default_model_path  # noqa: E402

TICK_S = 0.010
"""The caller's timer interval while it waits for the warm-up."""


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


def warm_worker(device: str, scratch: Path) -> tuple[Worker, BackgroundStart, float, list[float]]:
    """A worker started and warmed up as the module does it, while this thread ticks every
    TICK_S: (worker, its start, seconds until ready, the gaps between ticks)."""
    worker = Worker(sys.executable, dict(os.environ), REPO)
    started = time.perf_counter()
    start = BackgroundStart(worker, (lambda: warmup_request(scratch, device, default_model_path()), scratch))
    gaps, last = [], time.perf_counter()
    while not start.done():
        time.sleep(TICK_S)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    return worker, start, time.perf_counter() - started, gaps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--runs", type=int, default=3, help="fresh commands, and requests to each worker, each")
    parser.add_argument("--case", type=Path, help="another case folder (default: BraTS20_Training_001); a small one "
                        "shows the start-up costs on a CPU, where a whole case's segmentation hides them")
    args = parser.parse_args(argv)
    case = args.case or case_files("BraTS20_Training_001")["t1ce"].parent
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as scratch:
        outputs = (Path(scratch) / f"out{i}" for i in range(1000))
        for i in range(args.runs):
            rows.append((f"fresh command {i + 1}", *fresh_command(segment_argv(case, next(outputs), args.device))))

        cold = Worker(sys.executable, dict(os.environ), REPO)
        started = time.perf_counter()
        cold.start()
        rows.append(("cold worker: start (until it answers its ping)", time.perf_counter() - started, 0))
        try:
            for i in range(args.runs):
                rows.append((f"cold worker: request {i + 1}", *worker_request(cold, segment_argv(case, next(outputs), args.device))))
        finally:
            cold.stop()

        worker, start, ready_s, gaps = warm_worker(args.device, Path(scratch) / "warmup")
        try:
            if start.error is not None:
                raise SystemExit(f"the warm-up worker did not start: {start.error}")
            rows.append((f"warmed worker: start + phantom warm-up, in the background (on {start.device})", ready_s,
                         start.warmup_code))
            for i in range(args.runs):
                rows.append((f"warmed worker: request {i + 1}", *worker_request(worker, segment_argv(case, next(outputs), args.device))))
        finally:
            worker.stop()
        longest = max(gaps) if gaps else 0.0
        notes.append(f"Caller's thread during the warm-up: {len(gaps)} ticks of {TICK_S * 1000:.0f} ms, longest gap "
                     f"{longest * 1000:.0f} ms, median {sorted(gaps)[len(gaps) // 2] * 1000:.0f} ms" if gaps else
                     "Caller's thread during the warm-up: no tick (the warm-up ended at once)")
    print(f"# {case.name}, --device {args.device}, {os.cpu_count()} CPUs")
    print("| run | seconds | exit |\n|---|---|---|")
    for name, seconds, code in rows:
        print(f"| {name} | {seconds:.2f} | {code} |")
    for note in notes:
        print(f"\n{note}")
    return 1 if any(code for _, _, code in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
