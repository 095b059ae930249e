"""Progress reporting: a bar with elapsed time and time left on stderr for people, JSON lines on stdout for Slicer.

The bar is drawn here rather than by tqdm: the runtime is torch, numpy and SimpleITK, and one
more package would be one more install into Slicer's Python for a few lines of drawing.
"""

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


def clock_text(seconds: float) -> str:
    """mm:ss, or h:mm:ss from an hour on, as tqdm-style bars print times."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def time_left(elapsed: float, done: int, total: int) -> float | None:
    """Seconds left at the stage's rate so far (None before the first step is done)."""
    if done <= 0:
        return None
    return elapsed * max(total - done, 0) / done


class BarProgress:
    """A single-line text bar on stderr with the stage's elapsed time and an estimate of the time
    left, ``elapsed<left`` as tqdm prints them, redrawn at most ten times a second.

    A stage's clock starts at the report before its first one (the end of the previous stage,
    or the bar's creation), because a stage's first report may already count finished work
    (``segment`` reports after its first batch).
    """

    def __init__(self, stream=sys.stderr, width: int = 30, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.width = width
        self.clock = clock
        self.last_draw = float("-inf")
        self.last_report = clock()
        self.stage = ""
        self.stage_start = self.last_report
        self.open_line = False

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = self.clock()
        if stage != self.stage:
            self.stage, self.stage_start, self.last_draw = stage, self.last_report, float("-inf")
        self.last_report = now
        finished = done >= total
        if not finished and now - self.last_draw < 0.1:
            return
        self.last_draw = now
        filled = int(self.width * min(done, total) / max(total, 1))
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = now - self.stage_start
        left = time_left(elapsed, done, total)
        timing = clock_text(elapsed) if finished else f"{clock_text(elapsed)}<{'?' if left is None else clock_text(left)}"
        # Padded: a shorter line must cover the end of the longer one it overwrites.
        self.stream.write(f"\r{stage:<12} [{bar}] {done}/{total} {timing:<11}")
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
