"""Per-round training progress: a one-line bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

logger = logging.getLogger(__name__)

BAR_WIDTH = 24
REDRAW_SECONDS = 0.1


def render_bar(label: str, done: int, total: int, loss: float | None = None) -> str:
    """One progress line, e.g. ``round 3/20 [#######.....] 58% loss 0.213``."""
    fraction = 1.0 if total <= 0 else min(max(done / total, 0.0), 1.0)
    filled = int(round(fraction * BAR_WIDTH))
    text = f"{label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {int(fraction * 100):3d}%"
    if loss is not None:
        text += f" loss {loss:.3f}"
    return text


class RoundProgress:
    """Training progress of one round (a :class:`clientagent.trainer.TrainingObserver`).

    On a terminal it redraws one line in place, at most every ``REDRAW_SECONDS`` (the training
    loop calls it from a worker thread after every step, so drawing must stay cheap). Elsewhere
    it logs one line when training starts and leaves the rest to the caller's summary line.
    """

    def __init__(
        self,
        label: str,
        *,
        stream: TextIO | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        """Args:
        label: prefix of every line, e.g. ``round 3/20``.
        stream: where the bar is drawn (default: sys.stderr).
        tty: draw a bar (default: whether ``stream`` is a terminal).
        clock: monotonic clock (tests inject one).
        """
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream) if tty is None else tty
        self._clock = clock
        self._last_draw = -1.0
        self._lock = threading.Lock()
        self._drawn = False

    def started(self, *, rows: int, epochs: int, steps: int) -> None:
        """Training of ``rows`` rows for ``epochs`` epochs (``steps`` optimizer steps) begins."""
        if self.tty:
            self._draw(render_bar(self.label, 0, steps), force=True)
        else:
            logger.info("%s: training %d epoch(s) on %d rows", self.label, epochs, rows)

    def step(self, step: int, total: int) -> None:
        """Optimizer step ``step`` of ``total`` is done (throttled redraw)."""
        if self.tty:
            self._draw(render_bar(self.label, step, total), force=step >= total)

    def finished(self, *, train_loss: float) -> None:
        """Training is done: draw the full bar with the loss and end the line."""
        if self.tty:
            self._draw(render_bar(self.label, 1, 1, train_loss), force=True)
            self.close()

    def close(self) -> None:
        """End the bar's line if one was drawn (safe to call twice)."""
        with self._lock:
            if self._drawn:
                self.stream.write("\n")
                self.stream.flush()
                self._drawn = False

    def _draw(self, line: str, *, force: bool) -> None:
        now = self._clock()
        with self._lock:
            if not force and now - self._last_draw < REDRAW_SECONDS:
                return
            self._last_draw = now
            # \r and clear-to-end-of-line: redraw in place even if the line got shorter.
            self.stream.write("\r" + line + "\x1b[K")
            self.stream.flush()
            self._drawn = True


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
