"""An interrupted run (SIGTERM, Ctrl-C) exits promptly and leaves no partial output.

The real command runs in a subprocess on a 30-slice crop of BraTS20_Training_001 with a
tiny random-weights model and ``--progress jsonl``; once a progress line says it is
segmenting, the test sends the signal and checks the exit code, the message and the
output folder: nothing added (no output file, no hidden staging folder), and a file that
was there before is left alone.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from KANTumorSegLib.progress import parse_progress_line

REPO = Path(__file__).resolve().parent.parent


def start_segment(case: Path, out: Path, model: Path) -> subprocess.Popen:
    # Batches of 2 slices: many progress steps, so the signal lands mid-run.
    return subprocess.Popen(
        [sys.executable, "-m", "KANTumorSegLib", "segment", str(case), "-o", str(out), "--model", str(model),
         "--device", "cpu", "--batch-size", "2", "--progress", "jsonl"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_stage(process: subprocess.Popen, stage: str, timeout: float = 60.0) -> tuple[int, int]:
    """Read progress lines until one of ``stage`` arrives; its (done, total)."""
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        parsed = parse_progress_line(line)
        if parsed is not None and parsed[0] == stage:
            return parsed[1], parsed[2]
        if time.monotonic() > deadline:
            break
    process.kill()
    pytest.fail(f"no '{stage}' progress line; stderr: {process.stderr.read()}")


@pytest.mark.parametrize("signum, code, message", [
    (signal.SIGTERM, 143, "kantumorseg: terminated; no output was written."),
    (signal.SIGINT, 130, "kantumorseg: interrupted; no output was written."),
], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_segmentation_exits_promptly_and_leaves_nothing(cropped_case: Path, tiny_model: Path, tmp_path: Path,
                                                                   signum: int, code: int, message: str):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file\n")
    process = start_segment(cropped_case, out, tiny_model)
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


def test_sigterm_removes_the_output_folder_it_created(cropped_case: Path, tiny_model: Path, tmp_path: Path):
    out = tmp_path / "new" / "out"
    process = start_segment(cropped_case, out, tiny_model)
    wait_for_stage(process, "segment")
    assert out.is_dir()  # the staging folder lives inside it during the run
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 143, stderr
    assert not out.exists()
