"""How a ``kantumorseg`` command line ends: its exit codes, and running one in this process to its code.

The command (``cli``) and the worker (``worker``, which runs the command's own code for each
request) share both. They live here, below the two, so that neither imports the other for
them: ``cli`` imports ``worker`` to serve, ``worker`` imports only this module and is handed
the command to run.
"""

from __future__ import annotations

import sys
import traceback
import warnings
from typing import Callable

EXIT_OK = 0
EXIT_BUG = 1
"""An unexpected exception: the command prints a one-line summary and asks for a report."""
EXIT_USER_ERROR = 2
"""A mistake the user can fix (or running out of memory): one sentence, no output."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (SIGINT), as shells report it: 128 + 2."""
EXIT_TERMINATED = 143
"""SIGTERM (the Slicer module's Cancel), as shells report it: 128 + 15."""
INTERRUPT_CODES = (EXIT_INTERRUPTED, EXIT_TERMINATED)
"""Exit codes of a run stopped by a signal: a worker stops after such a request too."""


def run_to_exit_code(command: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run ``command(argv)`` (the ``kantumorseg`` entry point) in this process; its exit code.

    What would end a fresh process ends the run instead: argparse's ``SystemExit`` becomes
    its code, and an exception let through by ``--debug`` prints the traceback the command
    would print and becomes EXIT_BUG. A fresh warnings state per run, because Python shows a
    warning once per place and a second run must print what the command alone would print.
    """
    with warnings.catch_warnings():
        try:
            return command(argv)
        except SystemExit as stop:
            # argparse: a usage error (2, its message already on stderr) or --help (0).
            if stop.code is None or isinstance(stop.code, int):
                return stop.code or EXIT_OK
            print(stop.code, file=sys.stderr)
            return EXIT_BUG
        except Exception:
            traceback.print_exc()
            return EXIT_BUG
