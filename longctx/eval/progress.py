"""Evaluation that says what it is doing: one log line when a section starts (what it scores and
how much), one at each tenth of its work with the time left, one when it ends."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

log = logging.getLogger("longctx.eval")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, sections: int):
        self.sections, self.number = sections, 0
        self.name, self.unit, self.total, self.done = "", "", 0, 0
        self._start, self._next_report = 0.0, 0

    @contextmanager
    def section(self, name: str, total: int, unit: str, what: str = ""):
        """A section of `total` units of work (windows, trials, facts), described by `what`."""
        self.number += 1
        self.name, self.unit, self.total, self.done = name, unit, max(total, 0), 0
        self._start, self._next_report = time.monotonic(), max(total // 10, 1)
        log.info(
            "eval %d/%d %s: %d %s%s",
            self.number,
            self.sections,
            name,
            total,
            unit,
            f" ({what})" if what else "",
        )
        yield self
        log.info(
            "eval %d/%d %s done in %s",
            self.number,
            self.sections,
            name,
            _clock(time.monotonic() - self._start),
        )

    def advance(self, units: int = 1) -> None:
        self.done += units
        if self.done < self._next_report or self.done >= self.total:
            return
        while self._next_report <= self.done:
            self._next_report += max(self.total // 10, 1)
        elapsed = time.monotonic() - self._start
        left = elapsed / self.done * (self.total - self.done)
        log.info(
            "eval %d/%d %s: %d%% (%d/%d %s), %s elapsed, about %s left",
            self.number,
            self.sections,
            self.name,
            100 * self.done // self.total,
            self.done,
            self.total,
            self.unit,
            _clock(elapsed),
            _clock(left),
        )
