"""Where the time of one ``kantumorseg segment`` run goes, stage by stage.

benchmark.py times the whole command; this splits it along the command's own progress
reports (read, preprocess, segment, each written file), in one warm process, so a lever can
be aimed at the stage that costs the time. With ``--profile`` the last repeat also runs under
cProfile and the functions with the most time of their own are printed.

    .venv/bin/python Testing/benchmarks/command_stages.py --device cpu --repeats 3
    python3 Testing/benchmarks/command_stages.py --device cuda --repeats 5 --profile   # on the H200
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark import case_files  # noqa: E402  (the benchmark's own case lookup)


def stage_times(case: str, model: Path, device: str, batch: int, precision: str) -> dict[str, float]:
    """Seconds between consecutive progress reports of one ``segment_case`` call, by stage."""
    from KANTumorSegLib.pipeline import segment_case

    files = case_files(case)
    marks: list[tuple[float, str, int]] = []

    def progress(stage: str, done: int, total: int) -> None:
        marks.append((time.perf_counter(), stage, done))

    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        segment_case({m: files[m] for m in ("t1", "t1ce", "t2", "flair")}, Path(work) / "out", case, model,
                     device=device, batch_size=batch, progress=progress, precision=precision)
        end = time.perf_counter()
    # segment_case checks the output folder and the model card before its first report, and
    # loads the model between the last "read" report and the first "preprocess" one.
    times: dict[str, float] = {"output folder and card check": marks[0][0] - start}
    previous = marks[0][0]
    for when, stage, done in marks[1:]:
        # The write stage reports once per file; the others accumulate per slice.
        key = {"write": f"write {done}", "preprocess": "model load + preprocess"}.get(stage, stage)
        times[key] = times.get(key, 0.0) + when - previous
        previous = when
    times["after the last report"] = end - previous
    times["total"] = end - start
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="BraTS20_Training_001")
    parser.add_argument("--model", type=Path, default=REPO / "Resources" / "Models" / "kanunet2d_brats.safetensors")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one untimed warm-up run")
    parser.add_argument("--profile", action="store_true", help="also profile one more run with cProfile")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    run = (args.case, args.model, args.device, args.batch, args.precision)
    stage_times(*run)  # warm-up: CUDA context, kernels, file cache
    runs = [stage_times(*run) for _ in range(args.repeats)]
    print(f"# {args.case}, {args.model.name}, device {args.device}, {torch.get_num_threads()} threads, "
          f"{args.repeats} runs after one warm-up")
    print("| stage | median s | min s | max s |\n|---|---|---|---|")
    for key in runs[0]:
        values = [r.get(key, 0.0) for r in runs]
        print(f"| {key} | {np.median(values):.3f} | {min(values):.3f} | {max(values):.3f} |")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(stage_times, *run)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
