"""Processes that tests start, ended on every path: passed, failed, timed out or interrupted.

Issue 20: a test that timed out waiting for its command left the command running, spinning a
core, 13 minutes later. Every process here starts in a session of its own (its own process
group), and when the test is done with it the whole group is killed: the command and anything
it started (the Python a launcher starts, a worker), even after the command itself ended.
``run`` replaces ``subprocess.run``; the ``ends`` fixture (conftest.py) does the same for a
process started otherwise (``start``, ``slicer_process.launch``).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

DEFAULT_TIMEOUT_S = 900.0
"""What a ``run`` without its own timeout may take: far more than the slowest command of the
suite on a busy 2-core machine, so that only a hang reaches it."""


def start(command: Sequence[str | Path], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` in a session (and process group) of its own."""
    return subprocess.Popen([str(c) for c in command], start_new_session=True, **kwargs)


def end_group(process: subprocess.Popen) -> None:
    """Kill (SIGKILL) what is left of the process group of ``process``, reap it and close its pipes.

    The group's id is the process's pid; Linux gives no new process that pid while any member
    of the group lives, so after the process was reaped the id still names only its leftovers
    (none: ProcessLookupError).
    """
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def run(command: Sequence[str | Path], *, input: str | bytes | None = None, timeout: float | None = DEFAULT_TIMEOUT_S,
        check: bool = False, capture_output: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` (same arguments and result), in its own process group, killed with
    all it started when the command times out or anything (Ctrl-C included) interrupts the wait."""
    if capture_output:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    process = start(command, **kwargs)
    try:
        stdout, stderr = process.communicate(input, timeout=timeout)
    finally:
        end_group(process)
    completed = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if check:
        completed.check_returncode()
    return completed
