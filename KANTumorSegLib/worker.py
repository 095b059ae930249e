"""``kantumorseg worker``: run ``segment`` requests read from stdin, one after another, in one process.

A fresh process pays for Python, the torch import and the GPU start-up (seconds) on every
run; the 3D Slicer module, which segments one case, lets the user edit, then runs again,
keeps a worker instead and pays them once. Each request is the argument list of the
``segment`` command and runs through the command's own code (``cli.main``), so its output
lines, error sentences, exit code and atomic outputs are the command's. The protocol, one
JSON object per line:

- stdin: ``{"argv": ["segment", ...]}``, or ``{"ping": true}`` (a client's check that the
  worker reads its requests);
- stdout: the command's own stdout and stderr, then ``{"event": "exit", "code": N}``; for a
  ping, ``{"event": "pong"}``. Anything but a segment request is refused with the command's
  kind of one-sentence error and exit code 2.

The worker ends with 0 at the end of stdin (its client closed it or exited) and after
``--idle-timeout`` seconds without a request (default 600), so that an idle worker does not
hold memory, a GPU's included, forever. A SIGTERM (or Ctrl-C) during a request ends that
request as it ends the command (its outputs removed, exit 143 or 130), then the worker.
At module level only the standard library and ``exit_codes`` are imported, so that the worker
starts at once; the command it runs is handed to ``serve`` by ``cli``, which keeps the import
graph one-way (``cli`` -> ``worker`` -> ``exit_codes``).
"""

from __future__ import annotations

import gc
import json
import queue
import re
import sys
import threading
from typing import Callable

from .exit_codes import EXIT_USER_ERROR, INTERRUPT_CODES, run_to_exit_code

IDLE_TIMEOUT_S = 600.0
"""Seconds without a request after which a worker exits (``--idle-timeout``)."""

_EXIT_LINE = re.compile(r'\{"event": "exit", "code": (-?\d+)\}$')


def exit_line(code: int) -> str:
    """The line that ends a request's output."""
    return json.dumps({"event": "exit", "code": code})


def split_exit_line(line: str) -> tuple[str, int | None]:
    """(text before the exit event, exit code) of a line that ends a request; (line, None) for
    any other line. The text before is the end of an output line the request left unfinished."""
    text = line.rstrip("\r\n")
    match = _EXIT_LINE.search(text)
    if match is None:
        return line, None
    return text[:match.start()], int(match.group(1))


def request_argv(line: str) -> list[str] | None:
    """The ``segment`` argument list of a request line; None for a ping.

    Raises KANTumorSegError for anything else: the worker runs the segment command only.
    """
    from .errors import KANTumorSegError

    try:
        request = json.loads(line)
    except ValueError:
        request = None
    if isinstance(request, dict) and request.get("ping") is True:
        return None
    argv = request.get("argv") if isinstance(request, dict) else None
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv) and argv[0] == "segment"):
        shown = line.strip()
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise KANTumorSegError(f'The worker runs only segment requests ({{"argv": ["segment", ...]}}); got {shown}.')
    return argv


def release_gpu_memory() -> None:
    """Hand the memory torch caches on the GPU back between requests (the model is reloaded
    per request), so that an idle worker holds little of it."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        # Tensors held only by reference cycles (a traceback's frames) would keep their blocks.
        gc.collect()
        torch.cuda.empty_cache()


def _reply(line: str) -> None:
    # stderr first: in a merged pipe, the request's last error sentence must come before its end.
    sys.stderr.flush()
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _read_requests(stream, requests: queue.Queue) -> None:
    """Reader thread: every line of stdin, then None at its end (a portable wait with a timeout)."""
    for line in stream:
        requests.put(line)
    requests.put(None)


def serve(command: Callable[[list[str]], int], idle_timeout_s: float | None = IDLE_TIMEOUT_S) -> int:
    """Answer requests from stdin until it ends, or for ``idle_timeout_s`` (None or 0: no
    limit) none comes; the exit code of the worker.

    ``command`` is the command's code (``cli.main``, which the ``kantumorseg`` entry point
    runs); each request's argument list runs through it, so a request prints, fails and exits
    as the command does.
    """
    from .errors import KANTumorSegError

    requests: queue.Queue = queue.Queue()
    threading.Thread(target=_read_requests, args=(sys.stdin, requests), daemon=True).start()
    while True:
        try:
            line = requests.get(timeout=idle_timeout_s or None)
        except queue.Empty:
            return 0
        if line is None:
            return 0
        if not line.strip():
            continue
        try:
            argv = request_argv(line)
        except KANTumorSegError as error:
            print(f"kantumorseg: error: {error}", file=sys.stderr)
            _reply(exit_line(EXIT_USER_ERROR))
            continue
        if argv is None:
            _reply(json.dumps({"event": "pong"}))
            continue
        code = run_to_exit_code(command, argv)
        release_gpu_memory()
        _reply(exit_line(code))
        if code in INTERRUPT_CODES:
            return code
