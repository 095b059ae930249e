"""How reliably an interrupted ``kantumorseg segment`` ends: many runs, each sent SIGTERM or
SIGINT at a random moment, with the CPUs kept busy; how many ended within the limit (10 s).

Issue 20: an interrupted run could, rarely, never end: its cleanup had run and its message was
printed, then ``exit(143)`` spun forever in a native exit handler of SimpleITK. One run in
dozens did not show it, so this runs hundreds, outside the CI suite.

Every run is the real command (``python -m KANTumorSegLib segment``, ``--progress jsonl``,
batches of 2 slices, the CPU) on the 30-slice crop of BraTS20_Training_001 with the tiny
random-weights model, as Testing/test_interrupt.py runs it, into a folder holding a user's
file. Once its first progress line shows (its signal handlers are in place) it waits a random
time in [0, --spread] s, so that the signal lands in any stage (reading, checks, segmenting,
writing) or after the run finished, then sends the signal. A run passes when it ends within
--limit s of the signal with the signal's code (143, 130) and the user's file alone in its
folder, or with 0 and complete outputs when it finished first. A run still alive at the limit
is reported with its process state, then killed (its whole process group).

--load N starts N processes that spin a core each for the whole benchmark, as a busy machine
(or CI) does. --source DIR runs the KANTumorSegLib folder inside DIR instead of this
repository's, to measure another version with the same harness, e.g. the code before a fix:

    .venv/bin/python Testing/benchmarks/interrupt_stress.py --runs 200 --seed 20
    git archive 37cf0f7 KANTumorSegLib | tar -x -C /tmp/before
    .venv/bin/python Testing/benchmarks/interrupt_stress.py --runs 200 --seed 20 --source /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "Testing"))

from conftest import CASE_001, SAMPLES, write_cropped_case, write_tiny_model  # noqa: E402

EXPECTED_CODE = {signal.SIGTERM: 143, signal.SIGINT: 130}
START_LIMIT_S = 300.0
"""Seconds a run may take to print its first progress line (Python and torch start slowly under load)."""


@dataclass
class Outcome:
    signal: str
    delay_s: float
    ended: bool
    seconds_to_end: float
    code: int | None
    last_stage: str
    problem: str
    """Empty when the run passed; else what was wrong."""


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the run's whole process group (it was started in its own session) and reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def process_state(pid: int) -> str:
    """The State and wchan of a live process, read from /proc: why it has not ended."""
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State:"))
        wchan = Path(f"/proc/{pid}/wchan").read_text().strip() or "-"
    except (OSError, StopIteration):
        return "state unknown"
    return f"{state.split(':', 1)[1].strip()}, wchan {wchan}"


def last_stage(stdout: str) -> str:
    """The stage of the last progress line, or "done" after the final summary line."""
    stage = "none"
    for line in stdout.splitlines():
        try:
            parsed = json.loads(line)
        except ValueError:
            continue
        if isinstance(parsed, dict) and "stage" in parsed:
            stage = parsed["stage"]
    return stage


def one_run(index: int, signum: signal.Signals, delay_s: float, case: Path, model: Path, work: Path,
            source: Path, limit_s: float) -> Outcome:
    out = work / f"run{index:04d}"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file\n")
    command = [sys.executable, "-m", "KANTumorSegLib", "segment", str(case), "-o", str(out), "--model", str(model),
               "--device", "cpu", "--batch-size", "2", "--progress", "jsonl"]
    # Its own session: the kill on a hang reaches anything it started, and a Ctrl-C of the
    # benchmark reaches only the benchmark, which kills its runs in the finally below.
    process = subprocess.Popen(command, cwd=source, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        ready, _, _ = select.select([process.stdout], [], [], START_LIMIT_S)
        first = process.stdout.readline() if ready else b""
        if not first:
            return Outcome(signum.name, delay_s, False, 0.0, process.poll(), "none",
                           f"no progress line within {START_LIMIT_S:.0f} s")
        time.sleep(delay_s)
        process.send_signal(signum)
        sent = time.monotonic()
        try:
            stdout, stderr = process.communicate(timeout=limit_s)
        except subprocess.TimeoutExpired:
            state = process_state(process.pid)
            kill_group(process)
            return Outcome(signum.name, delay_s, False, limit_s, None, "?", f"still running after {limit_s:.0f} s ({state})")
        seconds = time.monotonic() - sent
    finally:
        if process.poll() is None:
            kill_group(process)
    text, errors = (first + stdout).decode(), stderr.decode()
    names = sorted(p.name for p in out.iterdir())
    code = process.returncode
    if code == EXPECTED_CODE[signum]:
        problem = "" if names == ["notes.txt"] else f"left {names}"
    elif code == 0:
        # Finished before the signal landed: its four outputs and the user's file.
        problem = "" if "notes.txt" in names and not any(n.startswith(".") for n in names) and len(names) > 4 else f"left {names}"
    else:
        # The end of stderr: a fatal error's or a native library's lines come before the last one.
        problem = f"exit code {code}; stderr ends:\n    " + "\n    ".join(errors.strip().splitlines()[-12:])
    if "Traceback" in errors:
        problem += " traceback on stderr"
    return Outcome(signum.name, delay_s, True, seconds, code, last_stage(text), problem)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument("--load", type=int, default=1, help="processes spinning a core each meanwhile")
    parser.add_argument("--spread", type=float, default=8.0, help="the signal comes 0 to this many s after the first progress line")
    parser.add_argument("--limit", type=float, default=10.0, help="s from the signal within which a run must end")
    parser.add_argument("--source", type=Path, default=REPO, help="folder whose KANTumorSegLib is run")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    plan = [(rng.choice([signal.SIGTERM, signal.SIGINT]), rng.uniform(0, args.spread)) for _ in range(args.runs)]
    print(f"command: {shlex.join([sys.executable, *sys.argv])}", flush=True)
    started = time.monotonic()
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(args.load)]
    try:
        with tempfile.TemporaryDirectory(prefix="interrupt_stress_") as temporary:
            work = Path(temporary)
            (work / "case").mkdir()
            case = write_cropped_case(SAMPLES / CASE_001, work / "case")
            model = write_tiny_model(work / "tiny.safetensors")
            with ThreadPoolExecutor(max_workers=args.parallel) as pool:
                outcomes = list(pool.map(lambda job: one_run(job[0], *job[1], case, model, work, args.source.resolve(), args.limit),
                                         enumerate(plan)))
    finally:
        for spinner in load:
            kill_group(spinner)
    minutes = (time.monotonic() - started) / 60

    ended = [o for o in outcomes if o.ended]
    passed = [o for o in outcomes if o.ended and not o.problem]
    print(f"source: {args.source.resolve()}; seed {args.seed}; {args.runs} runs, {args.parallel} at a time, "
          f"{args.load} spinning load process(es), {os.cpu_count()} CPUs; {minutes:.1f} min")
    print(f"ended within {args.limit:.0f} s of the signal: {len(ended)}/{len(outcomes)}; "
          f"passed (right code, nothing partial left): {len(passed)}/{len(outcomes)}")
    if ended:
        times = sorted(o.seconds_to_end for o in ended)
        print(f"seconds from signal to exit: median {statistics.median(times):.2f}, max {times[-1]:.2f}")
    for name in ("SIGTERM", "SIGINT"):
        mine = [o for o in outcomes if o.signal == name]
        print(f"  {name}: {sum(o.ended for o in mine)}/{len(mine)} ended")
    stages: dict[str, int] = {}
    for o in ended:
        stages[o.last_stage] = stages.get(o.last_stage, 0) + 1
    print("last progress stage before the exit: " + ", ".join(f"{k} {v}" for k, v in sorted(stages.items())))
    for index, o in enumerate(outcomes):
        if o.problem:
            print(f"  run {index} ({o.signal} after {o.delay_s:.2f} s): {o.problem}")
    return 0 if len(passed) == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
