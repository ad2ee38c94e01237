"""The per-round progress bar and its plain-log fallback (clientagent.progress)."""

from __future__ import annotations

import io
import logging

from clientagent.progress import RoundProgress, render_bar


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_render_bar():
    assert render_bar("round 3/20", 0, 10) == "round 3/20 [........................]   0%"
    assert render_bar("round 3/20", 7, 12, 0.2134) == (
        "round 3/20 [##############..........]  58% loss 0.213"
    )
    assert render_bar("r", 5, 0).endswith("] 100%")


def test_bar_redraws_in_place_at_most_every_tenth_of_a_second():
    stream, clock = io.StringIO(), Clock()
    bar = RoundProgress("round 3/20", stream=stream, tty=True, clock=clock)

    bar.started(rows=4394, epochs=1, steps=100)
    for step in range(1, 51):
        bar.step(step, 100)  # same instant: throttled
    clock.now = 0.5
    bar.step(51, 100)
    bar.step(100, 100)  # the last step is always drawn
    bar.finished(train_loss=0.213)

    frames = stream.getvalue().split("\r")[1:]
    assert len(frames) == 4  # start, step 51, step 100, final
    assert "  51%" in frames[1]
    assert frames[-1] == "round 3/20 [########################] 100% loss 0.213\x1b[K\n"
    bar.close()  # idempotent: no second newline
    assert stream.getvalue().count("\n") == 1


def test_without_a_terminal_it_logs_one_line_and_draws_nothing(caplog):
    caplog.set_level(logging.INFO, logger="clientagent")
    stream = io.StringIO()
    bar = RoundProgress("round 3/20", stream=stream)  # StringIO is not a TTY

    bar.started(rows=4394, epochs=1, steps=69)
    for step in range(1, 70):
        bar.step(step, 69)
    bar.finished(train_loss=0.2)
    bar.close()

    assert stream.getvalue() == ""
    assert "round 3/20: training 1 epoch(s) on 4394 rows" in caplog.text
