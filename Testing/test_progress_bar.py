"""The terminal bar shows each stage's elapsed time and an estimate of the time left, tqdm-style."""

from __future__ import annotations

import io

from KANTumorSegLib.progress import BarProgress, clock_text, time_left


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def drawn_lines(stream: io.StringIO) -> list[str]:
    """Every redraw of the bar, in order (redraws start with a carriage return)."""
    return [part.rstrip("\n").rstrip() for part in stream.getvalue().split("\r") if part]


def test_clock_text_reads_like_tqdm():
    assert clock_text(0) == "00:00"
    assert clock_text(75.4) == "01:15"
    assert clock_text(3725) == "1:02:05"


def test_time_left_is_unknown_before_the_first_step_and_scales_with_the_rate():
    assert time_left(5.0, 0, 10) is None
    assert time_left(10.0, 25, 100) == 30.0
    assert time_left(10.0, 100, 100) == 0.0


def test_the_bar_shows_elapsed_and_left_then_the_stage_total():
    clock, stream = FakeClock(), io.StringIO()
    bar = BarProgress(stream, width=10, clock=clock)
    clock.now += 2.0  # reading the model card, before the first report
    bar("segment", 0, 100)
    clock.now += 10.0
    bar("segment", 25, 100)
    clock.now += 30.0
    bar("segment", 100, 100)
    lines = drawn_lines(stream)
    # The stage's clock starts at the bar's creation, the report before its first one.
    assert lines[0] == "segment      [----------] 0/100 00:02<?"
    assert lines[1] == "segment      [##--------] 25/100 00:12<00:36"
    assert lines[2] == "segment      [##########] 100/100 00:42"
    assert stream.getvalue().endswith("\n") and not bar.open_line


def test_a_new_stage_starts_its_clock_where_the_previous_stage_ended():
    clock, stream = FakeClock(), io.StringIO()
    bar = BarProgress(stream, width=4, clock=clock)
    bar("read", 0, 4)
    clock.now += 1.0
    bar("read", 4, 4)
    clock.now += 3.0  # the first batch runs before segment's first report
    bar("segment", 16, 32)
    assert drawn_lines(stream)[-1] == "segment      [##--] 16/32 00:03<00:03"


def test_redraws_are_throttled_but_the_end_of_a_stage_always_shows():
    clock, stream = FakeClock(), io.StringIO()
    bar = BarProgress(stream, width=4, clock=clock)
    for done in range(1, 10):
        clock.now += 0.01
        bar("preprocess", done, 10)
    clock.now += 0.01
    bar("preprocess", 10, 10)
    lines = drawn_lines(stream)
    assert len(lines) == 2
    assert lines[-1].startswith("preprocess   [####] 10/10 ")
