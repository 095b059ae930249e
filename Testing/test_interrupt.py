"""An interrupted run (SIGTERM, Ctrl-C) exits promptly and leaves no partial output.

The real command runs in a subprocess on a 30-slice crop of BraTS20_Training_001 with a
tiny random-weights model and ``--progress jsonl``; once a progress line says it is
segmenting, the test sends the signal and checks the exit code, the message and the
output folder: nothing added (no output file, no hidden staging folder), and a file that
was there before is left alone. Every process is killed with its group when its test ends
(the ``ends`` fixture), so that a run that does not stop fails its test and nothing more.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import processes
import pytest

from KANTumorSegLib.progress import parse_progress_line

REPO = Path(__file__).resolve().parent.parent


def start_segment(case: Path, out: Path, model: Path, env: dict[str, str] | None = None,
                  extra: tuple[str, ...] | list[str] = ()) -> subprocess.Popen:
    # Batches of 2 slices: many progress steps, so the signal lands mid-run.
    return processes.start(
        [sys.executable, "-m", "KANTumorSegLib", "segment", str(case), "-o", str(out), "--model", str(model),
         "--device", "cpu", "--batch-size", "2", "--progress", "jsonl", *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_stage(process: subprocess.Popen, stage: str, timeout: float = 60.0) -> tuple[int, int]:
    """Read progress lines until one of ``stage`` arrives; its (done, total)."""
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        parsed = parse_progress_line(line)
        if parsed is not None and parsed[0] == stage:
            return parsed[1], parsed[2]
        if time.monotonic() > deadline:
            break
    pytest.fail(f"no '{stage}' progress line; stderr: {process.stderr.read()}")


@pytest.mark.parametrize("signum, code, message", [
    (signal.SIGTERM, 143, "kantumorseg: terminated; no output was written."),
    (signal.SIGINT, 130, "kantumorseg: interrupted; no output was written."),
], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_segmentation_exits_promptly_and_leaves_nothing(cropped_case: Path, tiny_model: Path, tmp_path: Path,
                                                                   ends, signum: int, code: int, message: str):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file\n")
    process = ends(start_segment(cropped_case, out, tiny_model))
    done, total = wait_for_stage(process, "segment")
    assert done < total, "the run finished segmenting before the signal could be sent"
    process.send_signal(signum)
    sent = time.monotonic()
    _, stderr = process.communicate(timeout=30)
    assert time.monotonic() - sent < 10, "the run did not stop promptly"
    assert process.returncode == code, stderr
    assert message in stderr
    assert "Traceback" not in stderr
    # Only the user's file: no output, no staging folder (.kantumorseg-*).
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_sigterm_removes_the_output_folder_it_created(cropped_case: Path, tiny_model: Path, tmp_path: Path, ends):
    out = tmp_path / "new" / "out"
    process = ends(start_segment(cropped_case, out, tiny_model))
    wait_for_stage(process, "segment")
    assert out.is_dir()  # the staging folder lives inside it during the run
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 143, stderr
    assert not out.exists()


NEVER_ENDING_EXIT_HANDLER = """\
# Test hook (test_interrupt.py): a native exit handler that never returns, as SimpleITK's did in
# issue 20. __cxa_atexit is how a shared library's C++ destructors are registered; pause() waits
# for a signal that never comes.
import ctypes

libc = ctypes.CDLL(None)
libc.__cxa_atexit(libc.pause, None, None)
"""


@pytest.fixture
def never_ending_exit_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python processes get a native exit handler that never returns
    (a sitecustomize module on PYTHONPATH), as a run hit by issue 20 had."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(NEVER_ENDING_EXIT_HANDLER)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}


def test_the_never_ending_exit_handler_holds_a_plain_python(never_ending_exit_env: dict[str, str]):
    # The hook is real: a Python that leaves through the normal exit never ends.
    with pytest.raises(subprocess.TimeoutExpired):
        processes.run([sys.executable, "-c", "pass"], env=never_ending_exit_env, timeout=3)


@pytest.mark.parametrize("signum, code, message", [
    (signal.SIGTERM, 143, "kantumorseg: terminated; no output was written."),
    (signal.SIGINT, 130, "kantumorseg: interrupted; no output was written."),
], ids=["SIGTERM", "SIGINT"])
def test_an_interrupted_run_ends_even_if_a_native_exit_handler_never_returns(
        cropped_case: Path, tiny_model: Path, tmp_path: Path, ends, never_ending_exit_env: dict[str, str],
        signum: int, code: int, message: str):
    # Issue 20: the cleanup done and the message printed, exit(143) spun forever in a native
    # exit handler of SimpleITK. The command must leave without running exit handlers.
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file\n")
    process = ends(start_segment(cropped_case, out, tiny_model, env=never_ending_exit_env))
    wait_for_stage(process, "segment")
    process.send_signal(signum)
    try:
        _, stderr = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("the interrupted run did not end: it ran the native exit handlers")
    assert process.returncode == code, stderr
    assert stderr.splitlines()[-1] == message  # printed and flushed before leaving
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_failed_run_ends_even_if_a_native_exit_handler_never_returns(cropped_case: Path, tmp_path: Path,
                                                                      never_ending_exit_env: dict[str, str]):
    done = processes.run([sys.executable, "-m", "KANTumorSegLib", "segment", str(cropped_case), "-o", str(tmp_path / "out"),
                          "--batch-size", "0"], cwd=REPO, env=never_ending_exit_env, capture_output=True, text=True,
                         timeout=20)
    assert done.returncode == 2
    assert done.stderr == "kantumorseg: error: --batch-size must be at least 1.\n"


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="signal masks are POSIX")
def test_cleanup_is_not_cut_short_by_a_signal(tmp_path: Path, monkeypatch):
    # A real SIGTERM, sent to this process just as AtomicOutputs starts removing its staging
    # folder, is held until the cleanup is over: the folder is gone, then the signal lands.
    import shutil

    from KANTumorSegLib import outputs as outputs_module

    class Stop(BaseException):
        pass

    def stop(signum, frame):
        raise Stop()

    real_rmtree = shutil.rmtree

    def rmtree_after_a_signal(path, *args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(outputs_module.shutil, "rmtree", rmtree_after_a_signal)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        outputs = outputs_module.AtomicOutputs(tmp_path / "out", {"labelmap": "case_seg.nii.gz"}, overwrite=False)
        outputs.__enter__()
        outputs.path("labelmap").write_bytes(b"partial")
        with pytest.raises(Stop):
            outputs.__exit__(RuntimeError, RuntimeError("failed"), None)
        assert not (tmp_path / "out").exists()
    finally:
        signal.signal(signal.SIGTERM, previous)
