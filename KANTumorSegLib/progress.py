"""Progress reporting: a bar on stderr for people, JSON lines on stdout for Slicer."""

from __future__ import annotations

import json
import sys
import time
from typing import Callable


def no_progress(stage: str, done: int, total: int) -> None:
    """Report nothing."""


def jsonl_progress(stage: str, done: int, total: int) -> None:
    """One JSON object per step on stdout: {"stage": ..., "done": ..., "total": ...}."""
    print(json.dumps({"stage": stage, "done": done, "total": total}), flush=True)


class BarProgress:
    """A single-line text bar on stderr, redrawn at most ten times a second."""

    def __init__(self, stream=sys.stderr, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.last_draw = 0.0
        self.stage = ""
        self.open_line = False

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        finished = done >= total
        if stage == self.stage and not finished and now - self.last_draw < 0.1:
            return
        self.stage, self.last_draw = stage, now
        filled = int(self.width * done / max(total, 1))
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r{stage:<12} [{bar}] {done}/{total}")
        if finished:
            self.stream.write("\n")
        self.open_line = not finished
        self.stream.flush()

    def end_line(self) -> None:
        """End a bar left halfway, so that an error message starts on its own line."""
        if self.open_line:
            self.stream.write("\n")
            self.stream.flush()
            self.open_line = False


def make_progress(kind: str) -> Callable[[str, int, int], None]:
    """The reporter for ``--progress``: bar, jsonl or none."""
    return {"bar": BarProgress(), "jsonl": jsonl_progress, "none": no_progress}[kind]


def parse_progress_line(line: str) -> tuple[str, int, int] | None:
    """(stage, done, total) from one ``--progress jsonl`` line, None for other output."""
    try:
        data = json.loads(line)
        return str(data["stage"]), int(data["done"]), int(data["total"])
    except (ValueError, KeyError, TypeError):
        return None
