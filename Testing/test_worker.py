"""``kantumorseg worker``: segment requests in one long-lived process give the command's results.

Real subprocesses: the worker is started by the Slicer module's client (slicer_process.Worker,
this machine's Python standing in for PythonSlicer) and compared with the plain command run in
its own process, on real BraTS crops (8 and 30 axial slices of BraTS20_Training_001) with
random-weights models of base width 4, so that each run takes seconds on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import processes
import pytest
import SimpleITK as sitk

from KANTumorSegLib import slicer_command, slicer_process
from KANTumorSegLib.progress import parse_progress_line

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def worker():
    """A worker started as the Slicer module starts it; stopped after the test."""
    started = slicer_process.Worker(sys.executable, {**os.environ, **slicer_command.child_environment(os.environ)})
    started.start()
    yield started
    started.stop()


def request(case: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return ["segment", str(case), "-o", str(out), "--model", str(model), "--device", "cpu", "--progress", "jsonl", *extra]


def through_worker(worker: slicer_process.Worker, argv: list[str]) -> tuple[int, list[str], float]:
    """(exit code, output lines, seconds) of one request."""
    start = time.monotonic()
    run = worker.submit(argv)
    lines = [line.rstrip("\n") for line in run.stdout]
    return run.wait(), lines, time.monotonic() - start


def plain_command(argv: list[str]) -> subprocess.CompletedProcess:
    return processes.run([sys.executable, "-m", "KANTumorSegLib", *argv], capture_output=True, text=True,
                         timeout=300, cwd=REPO)


def labels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def volumes(path: Path) -> list:
    return json.loads(path.read_text())["regions"]


def test_requests_give_the_commands_outputs_and_lines(worker, small_case: Path, cropped_case: Path, mixed_model: Path,
                                                      tmp_path: Path):
    # The model whose outputs hold every label: a labelmap of one class would hide differences.
    # Two cases of different sizes through one worker, the small one twice: a state carried from
    # one request to the next (model, warnings, signal handlers) would show.
    runs = [(small_case, "first"), (small_case, "second"), (cropped_case, "third")]
    seconds = {}
    for case, name in runs:
        code, lines, seconds[name] = through_worker(worker, request(case, tmp_path / name, mixed_model))
        assert code == 0, lines
        alone = plain_command(request(case, tmp_path / f"{name}_alone", mixed_model))
        assert alone.returncode == 0, alone.stderr
        # The same lines: every progress step, then the final 'done' line the module reads.
        assert [parse_progress_line(line) for line in lines[:-1]] == \
               [parse_progress_line(line) for line in alone.stdout.splitlines()[:-1]]
        done, done_alone = json.loads(lines[-1]), json.loads(alone.stdout.splitlines()[-1])
        assert done["stage"] == "done" and {k: v for k, v in done.items() if k != "files"} == \
               {k: v for k, v in done_alone.items() if k != "files"}
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == sorted(p.name for p in (tmp_path / f"{name}_alone").iterdir())
        np.testing.assert_array_equal(labels(tmp_path / name / "crop_seg.nii.gz"), labels(tmp_path / f"{name}_alone" / "crop_seg.nii.gz"))
        assert volumes(tmp_path / name / "crop_volumes.json") == volumes(tmp_path / f"{name}_alone" / "crop_volumes.json")
    assert worker.alive()
    # Timings are printed, not asserted (2 shared cores): the first request pays the torch import.
    print(f"\nworker request seconds on {os.cpu_count()} CPU cores: first (8 slices) {seconds['first']:.2f}, "
          f"second (8 slices) {seconds['second']:.2f}, third (30 slices) {seconds['third']:.2f}")


def test_a_warning_shows_in_every_request_as_in_the_command(worker, small_case: Path, tiny_model: Path, tmp_path: Path):
    # Python shows a warning once per place in a process: the worker must still show it on
    # each request, as each fresh command would. A real case with NaN voxels in its T1 warns.
    case = tmp_path / "nan_case"
    case.mkdir()
    for modality in ("t1ce", "t2", "flair"):
        (case / f"crop_{modality}.nii.gz").symlink_to(small_case / f"crop_{modality}.nii.gz")
    image = sitk.ReadImage(str(small_case / "crop_t1.nii.gz"), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[0, 0, :3] = np.nan
    nan_image = sitk.GetImageFromArray(array)
    nan_image.CopyInformation(image)
    # NRRD keeps NaN (ITK's NIfTI reader turns it into 0).
    sitk.WriteImage(nan_image, str(case / "crop_t1.nrrd"))

    alone = plain_command(request(case, tmp_path / "alone", tiny_model))
    warning = [line for line in alone.stderr.splitlines() if line.startswith("kantumorseg: warning:")]
    assert alone.returncode == 0 and len(warning) == 1 and "3 NaN or infinite voxels" in warning[0], alone.stderr
    for name in ("first", "second"):
        code, lines, _ = through_worker(worker, request(case, tmp_path / name, tiny_model))
        assert code == 0 and [line for line in lines if line.startswith("kantumorseg: warning:")] == warning, lines


def test_a_failed_request_is_the_commands_failure_and_the_worker_goes_on(worker, small_case: Path, tiny_model: Path,
                                                                         tmp_path: Path):
    missing = request(tmp_path / "no_such_case", tmp_path / "out", tiny_model)
    code, lines, _ = through_worker(worker, missing)
    alone = plain_command(missing)
    assert code == alone.returncode == 2
    # The one sentence the command prints, naming the folder, and nothing else.
    assert lines == alone.stderr.splitlines() == [f"kantumorseg: error: Case folder {tmp_path / 'no_such_case'} does not exist."]
    assert not (tmp_path / "out").exists()

    # A usage error ends as argparse ends the command: its usage text and exit code 2.
    code, lines, _ = through_worker(worker, ["segment", str(small_case)])
    assert code == 2 and lines[-1].endswith("error: the following arguments are required: -o/--output")

    code, lines, _ = through_worker(worker, request(small_case, tmp_path / "good", tiny_model))
    assert code == 0, lines
    assert json.loads(lines[-1])["stage"] == "done" and (tmp_path / "good" / "crop.seg.nrrd").is_file()
    assert worker.alive()


def test_the_protocol_refuses_other_requests_and_ends_at_the_end_of_its_input():
    # Raw stdin and stdout, as a client other than slicer_process would see them.
    requests = "\n".join(['{"ping": true}', '{"argv": ["info"]}', "not json", '{"argv": "segment"}', ""])
    done = processes.run([sys.executable, "-m", "KANTumorSegLib", "worker"], input=requests, capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ['{"event": "pong"}'] + ['{"event": "exit", "code": 2}'] * 3
    errors = done.stderr.splitlines()
    assert len(errors) == 3 and all(e.startswith("kantumorseg: error: The worker runs only segment requests") for e in errors)
    assert errors[0].endswith('got {"argv": ["info"]}.')


def test_the_worker_ends_when_its_client_closes_its_input(worker):
    worker.stop()
    # stop() closes the worker's stdin and waits: exit code 0 means it ended by itself, before any SIGTERM.
    assert worker.process.returncode == 0, "the worker did not exit by itself at the end of its input"
    assert not worker.alive()


def test_the_worker_exits_after_its_idle_timeout():
    idle = slicer_process.Worker(sys.executable, {**os.environ, **slicer_command.child_environment(os.environ)},
                                 idle_timeout_s=1.0)
    idle.start()
    try:
        assert idle.process.wait(timeout=30) == 0
        assert not idle.alive()
        with pytest.raises(slicer_process.WorkerError):
            idle.submit(["segment", "--help"])
    finally:
        idle.stop()


def test_sigterm_mid_request_leaves_nothing_and_ends_the_worker(worker, cropped_case: Path, tiny_model: Path,
                                                                tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file\n")
    # Batches of 2 slices: many progress steps, so that the signal lands mid-run.
    run = worker.submit(request(cropped_case, out, tiny_model, "--batch-size", "2"))
    for line in run.stdout:
        progress = parse_progress_line(line)
        if progress and progress[0] == "segment":
            assert progress[1] < progress[2], "the run finished segmenting before the signal could be sent"
            break
    worker.stop()  # SIGTERM to the worker's process group, as the module's Cancel sends it
    rest = [line.rstrip("\n") for line in run.stdout]
    assert run.wait() == 143, rest
    assert "kantumorseg: terminated; no output was written." in rest
    assert not any("Traceback" in line for line in rest)
    assert worker.process.wait(timeout=10) == 143
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the launcher's child through /proc (Linux)")
def test_through_a_launcher_requests_run_and_stop_reaches_the_python_it_started(small_case: Path, cropped_case: Path,
                                                                                 tiny_model: Path, tmp_path: Path, ends):
    """PythonSlicer is a launcher that starts the real Python as its child, passing its stdin
    and stdout on: a stand-in launcher does the same. Requests must reach the worker, and both
    ways of stopping it (closing its input, SIGTERM during a run) must end the child too."""
    launcher = tmp_path / "PythonSlicer"
    code = "import subprocess, sys; sys.exit(subprocess.Popen(sys.argv[1:]).wait())"
    launcher.write_text(f"#!/bin/sh\nexec \"{sys.executable}\" -c '{code}' \"{sys.executable}\" \"$@\"\n")
    launcher.chmod(0o755)
    environment = {**os.environ, **slicer_command.child_environment(os.environ)}

    idle = slicer_process.Worker(launcher, environment)
    idle.start()
    ends(idle.process)
    [child] = _children(idle.process.pid)
    assert through_worker(idle, request(small_case, tmp_path / "out", tiny_model))[0] == 0
    idle.stop()
    assert idle.process.returncode == 0 and not _alive(child)

    busy = slicer_process.Worker(launcher, environment)
    busy.start()
    ends(busy.process)
    [child] = _children(busy.process.pid)
    run = busy.submit(request(cropped_case, tmp_path / "cancelled", tiny_model, "--batch-size", "2"))
    for line in run.stdout:
        if (parse_progress_line(line) or ("",))[0] == "segment":
            break
    busy.stop()
    assert run.wait() == 143
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.1)
    assert not _alive(child), "the worker kept running after the launcher was stopped"
    assert not (tmp_path / "cancelled").exists()


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie waiting to be reaped counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
