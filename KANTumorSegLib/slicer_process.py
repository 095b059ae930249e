"""The 3D Slicer module's processes: the command started in its own process group (``launch``)
and stopped with all it started (``terminate_tree``), and the long-lived ``kantumorseg worker``
(Worker, WorkerRun), started and warmed up off Slicer's main thread (BackgroundStart). Standard
library only at module level (see slicer_command).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .slicer_command import LIBRARY_PACKAGE, library_parent
from .slicer_results import parse_output_line


def launch(command: Sequence[str], environ: Mapping[str, str], cwd: str | Path, stdin=None):
    """Start the command as slicer.util.launchConsoleProcess does (stdout and stderr merged,
    text lines, no console window on Windows), but in its own process group: PythonSlicer is
    a launcher that starts the real Python as a child, so cancelling must reach both.
    ``stdin``: as subprocess.Popen's (``subprocess.PIPE`` for a worker)."""
    import subprocess

    kwargs: dict = {"env": dict(environ), "cwd": str(cwd), "stdin": stdin, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT,
                    "universal_newlines": True, "encoding": "utf-8", "errors": "replace"}
    if os.name == "nt":
        info = subprocess.STARTUPINFO()
        info.dwFlags = subprocess.STARTF_USESHOWWINDOW
        info.wShowWindow = 0  # SW_HIDE
        kwargs["startupinfo"] = info
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
    else:
        kwargs["start_new_session"] = True
    return subprocess.Popen(list(command), **kwargs)


def terminate_tree(process, grace_s: float = 3.0) -> None:
    """Stop a process started by ``launch`` and all it started. On POSIX, SIGTERM first so
    that the command removes its partial output, then SIGKILL after ``grace_s``."""
    import subprocess

    if process.poll() is not None:
        return
    if os.name == "nt":
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], capture_output=True, check=False)
        process.wait()
        return
    import signal

    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(grace_s)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class WorkerError(RuntimeError):
    """The worker cannot take a request (it did not start, does not answer, or is busy)."""


IDLE_MARGIN_S = 5.0
"""A worker this close to its idle timeout is replaced rather than sent a request that it
might not read before it exits."""


class Worker:
    """A long-lived ``kantumorseg worker`` process (KANTumorSegLib/worker.py) that runs the
    module's ``segment`` command lines one after another.

    A fresh process per run pays for Python, the torch import and the GPU start-up every
    time; the worker pays them once. Each run is the command line ``build_command`` makes,
    without its ``python -m KANTumorSegLib`` head, and prints the command's own lines; it is
    read through a WorkerRun until the worker's exit event. Started as ``launch`` starts the
    command (same environment, folder, process group and merged output); ``stop`` ends it,
    cancelling a run in progress.
    """

    def __init__(self, python: str | Path, environ: Mapping[str, str], cwd: str | Path | None = None,
                 idle_timeout_s: float | None = None) -> None:
        from .worker import IDLE_TIMEOUT_S

        self.python = str(python)
        self.environ = dict(environ)
        self.cwd = Path(cwd) if cwd is not None else library_parent()
        self.idle_timeout_s = IDLE_TIMEOUT_S if idle_timeout_s is None else idle_timeout_s
        self.process = None
        self.busy = False
        self._last_used = 0.0

    @property
    def command(self) -> list[str]:
        return [self.python, "-m", LIBRARY_PACKAGE, "worker", "--idle-timeout", str(self.idle_timeout_s)]

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the process and check that it reads requests (a launcher that does not pass
        its stdin on would leave every run waiting): WorkerError when no answer comes."""
        import subprocess
        import time

        self.process = launch(self.command, self.environ, self.cwd, stdin=subprocess.PIPE)
        self._send({"ping": True})
        answer = _read_line_within(self.process.stdout, timeout_s)
        if answer is None or answer.strip() != json.dumps({"event": "pong"}):
            self.stop()
            if answer is None:
                raise WorkerError(f"the worker did not answer within {timeout_s:.0f} s")
            if not answer:
                raise WorkerError(f"the worker ended (exit code {self.process.returncode}) without answering")
            raise WorkerError(f"the worker answered {answer.strip()!r}")
        self._last_used = time.monotonic()

    def serves(self, python: str | Path, environ: Mapping[str, str]) -> bool:
        """Whether this worker was started with this Python and this environment."""
        return self.python == str(python) and self.environ == dict(environ)

    def alive(self) -> bool:
        """Whether the process runs and will take a request: not ended, and not so near its
        idle timeout that it could exit before reading one."""
        import time

        if self.process is None or self.process.poll() is not None:
            return False
        if self.busy or not self.idle_timeout_s or self.idle_timeout_s <= 0:
            return True
        limit = self.idle_timeout_s - min(IDLE_MARGIN_S, self.idle_timeout_s / 2)
        return time.monotonic() - self._last_used < limit

    def submit(self, argv: Sequence[str]) -> WorkerRun:
        """Send one ``segment ...`` argument list; its output is read through the WorkerRun."""
        if self.busy:
            raise WorkerError("the worker is busy with another run")
        if not self.alive():
            raise WorkerError("the worker is not running")
        self.busy = True
        try:
            self._send({"argv": [str(a) for a in argv]})
        except OSError as error:
            self.busy = False
            raise WorkerError(f"the worker did not take the request ({error})") from error
        return WorkerRun(self)

    def stop(self, grace_s: float = 3.0) -> None:
        """End the worker. During a run: SIGTERM at once (the run removes its partial output
        and ends with 143, as the command does); idle: close its stdin, so that it exits by
        itself, then SIGTERM after ``grace_s``."""
        import subprocess

        if self.process is None:
            return
        if self.process.poll() is None and not self.busy:
            try:
                self.process.stdin.close()
                self.process.wait(grace_s)
            except (OSError, subprocess.TimeoutExpired):
                pass
        terminate_tree(self.process, grace_s)
        if not self.busy:
            # Nobody reads it now; during a run, the run's reader sees its end and closes nothing.
            self.process.stdout.close()

    def _send(self, request: dict) -> None:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()

    def _finished(self) -> None:
        import time

        self.busy = False
        self._last_used = time.monotonic()


class WorkerRun:
    """One request to a Worker, read like a process's output: iterate ``stdout`` for its lines
    (stdout and stderr merged, as ``launch`` gives them), then ``wait()`` gives its exit code.

    The code is the command's, from the worker's exit event; if the worker ended before
    that event (cancelled, killed), it is the worker's own exit status.
    """

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.returncode: int | None = None
        self.stdout = self._lines()

    def _lines(self):
        from .worker import split_exit_line

        try:
            for line in self.worker.process.stdout:
                text, code = split_exit_line(line)
                if code is None:
                    yield line
                    continue
                if text:
                    yield text + "\n"
                self.returncode = code
                return
            self.returncode = self.worker.process.wait()
        finally:
            self.worker._finished()

    def wait(self) -> int:
        for _ in self.stdout:
            pass
        return self.returncode

    def poll(self) -> int | None:
        return self.returncode


START_TIMEOUT_S = 120.0
"""How long a worker may take to answer its first ping (a cold disk, an antivirus scan) before
the run waiting for it gets a process of its own; the next run tries a worker again."""


WARMUP_SHAPE = (240, 240, 16)
"""The warm-up phantom: BraTS's in-plane size and one batch of slices, so that the first real
case finds torch imported, the device started and the model's kernels loaded."""


def warmup_request(folder: str | Path, device: str, model: str | Path) -> list[str]:
    """Write a small synthetic phantom case into ``folder`` (in a process of its own, so that
    numpy and SimpleITK work never holds the caller's interpreter) and return the ``segment``
    request that warms a worker up on it."""
    import subprocess
    import sys

    folder = Path(folder)
    case = folder / "case"
    size = [str(n) for n in WARMUP_SHAPE]
    subprocess.run([sys.executable, "-m", f"{LIBRARY_PACKAGE}.phantom", str(case), "--size", *size],
                   check=True, capture_output=True, cwd=str(library_parent()))
    return ["segment", str(case), "-o", str(folder / "out"), "--device", device, "--model", str(model),
            "--progress", "jsonl", "--overwrite"]


class BackgroundStart:
    """Starts a Worker in a thread, then (optionally) warms it up with a phantom run, so that the
    thread that asks (Slicer's main thread) never waits: it polls ``done()``.

    error: why the worker did not start (None when it did); device: the device its warm-up ran
    on (from the done line), None before or without a warm-up; seconds: start plus warm-up.
    A failed warm-up (say, a model file that does not load) leaves a started worker: the real
    run then reports the command's own error.
    """

    def __init__(self, worker: Worker, warmup=None, timeout_s: float = START_TIMEOUT_S) -> None:
        """``warmup``: None, or a callable returning the warm-up's ``segment`` argument list (it
        runs in the thread, and may prepare files), and the scratch folder to delete afterwards."""
        import threading

        self.worker = worker
        self.error: Exception | None = None
        self.device: str | None = None
        self.warmup_code: int | None = None
        self.seconds: float | None = None
        self._thread = threading.Thread(target=self._run, args=(warmup, timeout_s), daemon=True)
        self._thread.start()

    def _run(self, warmup, timeout_s: float) -> None:
        import shutil
        import subprocess
        import time

        started = time.monotonic()
        try:
            self.worker.start(timeout_s)
            if warmup is not None:
                make_request, scratch = warmup
                try:
                    run = self.worker.submit(make_request())
                    for line in run.stdout:
                        parsed = parse_output_line(line)
                        if parsed.kind == "done":
                            self.device = json.loads(parsed.text).get("device")
                    self.warmup_code = run.wait()
                except (OSError, subprocess.CalledProcessError):
                    self.warmup_code = -1
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
        except (OSError, WorkerError) as error:
            self.error = error
        self.seconds = time.monotonic() - started

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait (scripts, tests, benchmarks; never Slicer's main thread) until done; whether it is."""
        self._thread.join(timeout_s)
        return self.done()


def _read_line_within(stream, timeout_s: float) -> str | None:
    """One line from a pipe, or None when none comes within ``timeout_s`` (a pipe has no
    read timeout on every platform: a helper thread reads it)."""
    import threading

    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return lines[0] if lines else None
