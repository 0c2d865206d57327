"""Progress of long start-up work (reading and converting weights, compiling): a bar
redrawn in place when stderr is a terminal, otherwise a log line at each quarter. Work that
ends within `QUIET_SECONDS` shows nothing (a small model loads in a second or two)."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger("pdserve.progress")

QUIET_SECONDS = 2.0  # nothing shown before this much time has passed
BAR_WIDTH = 30
REDRAW_SECONDS = 0.2


class Progress:
    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label, self.total = label, max(1, total)
        self.done = 0
        self._stream = stream if stream is not None else sys.stderr
        self._terminal = bool(getattr(self._stream, "isatty", lambda: False)())
        self._started = time.monotonic()
        self._drawn_at = 0.0
        self._logged_quarter = 0
        self._bar_shown = False

    def advance(self, units: int = 1) -> None:
        self.advance_to(self.done + units)

    def advance_to(self, done: int) -> None:
        """`done` units of `total` are complete (never goes back)."""
        if done <= self.done:
            return
        self.done = min(self.total, done)
        now = time.monotonic()
        if now - self._started < QUIET_SECONDS:
            return
        if self._terminal:
            if now - self._drawn_at >= REDRAW_SECONDS or self.done == self.total:
                self._draw(now)
            return
        quarter = 4 * self.done // self.total
        if quarter > self._logged_quarter:
            self._logged_quarter = quarter
            log.info("%s: %d of %d (%d%%), %.1f s", self.label, self.done, self.total,
                     100 * self.done // self.total, now - self._started)

    def finish(self) -> None:
        """The work is over: complete the bar's line (a terminal) or say so once."""
        elapsed = time.monotonic() - self._started
        if self._bar_shown:
            self.done = self.total
            self._draw(time.monotonic())
            self._stream.write("\n")
            self._stream.flush()
        elif not self._terminal and elapsed >= QUIET_SECONDS and self._logged_quarter < 4:
            log.info("%s: done, %.1f s", self.label, elapsed)

    def _draw(self, now: float) -> None:
        filled = BAR_WIDTH * self.done // self.total
        self._stream.write(f"\r{self.label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
                           f"{self.done}/{self.total} {now - self._started:.0f}s")
        self._stream.flush()
        self._drawn_at, self._bar_shown = now, True
