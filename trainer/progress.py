"""Progress output shared by the commands: the ETA format and a progress line that rewrites
itself on a terminal and prints about every 10% into a log file."""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


def format_eta(seconds: float) -> str:
    """Seconds as h:mm:ss."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressLine:
    """One progress line for `total` units of work: `update(done, text)` shows `text` plus the
    rate and the ETA, in place on a terminal, else about every 10% (a log stays short)."""

    def __init__(self, total: int, unit: str = "it", enabled: bool = True, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, rate_scale: float = 1.0):
        """rate_scale multiplies the rate shown (e.g. the number of ranks sharing the work)."""
        self.total, self.unit, self.enabled = total, unit, enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.clock = clock
        self.start = clock()
        self.rate_scale = rate_scale
        self.next_report = 0.0

    def update(self, done: int, text: str) -> None:
        """Report `done` of `total` units; `text` says what they are."""
        if not self.enabled:
            return
        frac = done / max(self.total, 1)
        if not self.tty and frac < self.next_report and done < self.total:
            return
        self.next_report = frac + 0.1
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = done / elapsed
        eta = format_eta((self.total - done) / rate) if rate > 0 else "?"
        line = f"{text} | {rate * self.rate_scale:.1f} {self.unit}/s | ETA {eta}"
        print(f"\r{line}" if self.tty else line, end="" if self.tty else "\n", file=self.stream, flush=True)
        if self.tty and done >= self.total:
            print(file=self.stream)
