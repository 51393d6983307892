"""Fail fast instead of hanging: end a rank whose run makes no progress for too long.

A rank stuck in a collective whose peer froze, on a dead network file system or in a lock left by
a killed process holds its whole job: the scheduler's time limit is the only way out, and that can
be days of idle accelerators. The watchdog turns such a stall into a loud exit within a set time:
what the rank was doing, every thread's stack, then a non-zero exit status. The launcher then
ends the other ranks, and rerunning the same command resumes from the last complete checkpoint.

Two layers: a Python thread that prints a one-line reason before the stacks and exits with
status 4 (it needs the GIL, which blocking waits release), and faulthandler's C-level timer as a
backstop for a call that holds the GIL forever; that one prints only the stacks and exits with
status 1 (faulthandler's own). faulthandler has one such timer per process: the watchdog owns it.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from typing import Callable, TextIO

STALL_EXIT_CODE = 4
"""Exit status of a rank ended by the watchdog (2: bad input, 3: the run stopped on purpose)."""


class StallWatchdog:
    """Ends this process when `beat` has not been called for `timeout_s` seconds.

    Call `beat(what)` at every sign of progress (a finished step, the start of a save); `what`
    names the work that follows and appears in the stall message. `timeout_s <= 0` disables it.
    Usable as a context manager; `stop` disarms it.
    """

    def __init__(self, timeout_s: float, rank: int = 0, *, backstop_grace_s: float = 60.0,
                 exit_fn: Callable[[int], None] = os._exit, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, poll_s: float | None = None):
        self.timeout_s = float(timeout_s)
        self.poll_s = poll_s if poll_s is not None else min(max(self.timeout_s / 4, 0.05), 30.0)
        self.rank = rank
        self.backstop_grace_s = backstop_grace_s
        self._exit = exit_fn
        self._stream = stream
        self._clock = clock
        self._last = clock()
        self._what = "start-up"
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self.fired = False

    @property
    def enabled(self) -> bool:
        """Whether a timeout is set."""
        return self.timeout_s > 0

    def start(self) -> "StallWatchdog":
        """Arm the watchdog (a no-op when disabled)."""
        if self.enabled and self._thread is None:
            self._last = self._clock()
            self._thread = threading.Thread(target=self._watch, name="mdt-stall-watchdog", daemon=True)
            self._thread.start()
            self._arm_backstop()
        return self

    @property
    def doing(self) -> str:
        """What the rank said it was doing at its last beat (e.g. "step 12")."""
        return self._what

    def beat(self, what: str) -> None:
        """Record progress; `what` is the work that comes next (shown if it stalls)."""
        self._what = what
        self._last = self._clock()

    def stop(self) -> None:
        """Disarm: the thread ends and the backstop timer is cancelled."""
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            if self.backstop_grace_s >= 0:
                faulthandler.cancel_dump_traceback_later()

    def __enter__(self) -> "StallWatchdog":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _arm_backstop(self) -> None:
        # Re-armed by the thread while progress is recent, so it fires only if the thread itself
        # cannot run (the GIL held by a stuck call) for timeout + grace.
        if self.backstop_grace_s < 0:
            return
        for stream in (self._stream or sys.stderr, sys.__stderr__):
            try:  # needs a real file descriptor; a captured stderr (tests, notebooks) has none
                faulthandler.dump_traceback_later(self.timeout_s + self.backstop_grace_s, exit=True, file=stream)
                return
            except (AttributeError, ValueError, OSError):
                continue

    def _watch(self) -> None:
        while not self._done.wait(self.poll_s):
            idle = self._clock() - self._last
            if idle < self.timeout_s:
                self._arm_backstop()
                continue
            self._fire(idle)
            return

    def _fire(self, idle: float) -> None:
        self.fired = True
        out = self._stream or sys.stderr
        print(f"mdt-train: error: rank {self.rank} made no progress for {idle:.0f}s (stuck in: {self._what}); "
              f"exiting with status {STALL_EXIT_CODE} so the job ends now; rerun the same command to resume from "
              f"the last complete checkpoint (limit: run.stall_timeout_s={self.timeout_s:g}). Stacks of every "
              "thread follow.", file=out, flush=True)
        try:
            faulthandler.dump_traceback(file=out, all_threads=True)
        except (ValueError, OSError):  # a stream without a file descriptor (tests)
            pass
        out.flush()
        self._exit(STALL_EXIT_CODE)
