"""How a run ends early: the exceptions that carry its exit status, and the stop request (signals
or the stop file) that ends it at a step boundary with a checkpoint."""

from __future__ import annotations

import os
import signal

FAILED = 6
"""Exit status of a rank that failed on an exception of any other kind (a bug, out of memory, a
collective that raised): the cause is the last line on stderr, after the traceback."""


class RunStopped(RuntimeError):
    """The run stopped on a problem a rerun would meet again (non-finite losses, a checkpoint that
    does not load); the message says why. Exit status 3."""

    exit_code = 3
    every_rank = False
    """Whether each rank reports it (a problem a rank may meet alone), not rank 0 for all."""


class StopRequested(RunStopped):
    """The run stopped because it was asked to (a signal or the stop file), after saving a
    checkpoint at a step boundary; rerunning the command resumes. Exit status 5."""

    exit_code = 5


class StopFlag:
    """Set by SIGTERM, SIGUSR1 or a first SIGINT (preemption, scancel, Ctrl-C) once `install`ed, or
    by the stop file: finish the current step, save a checkpoint and exit. A second SIGINT
    interrupts at once."""

    def __init__(self, stop_file: str):
        self.stop_file = stop_file
        self.reason = ""

    def install(self) -> None:
        """Take over the stop signals from now on (before, they end the process as usual)."""
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (tests)
                pass

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return bool(self.reason)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.reason = self.reason or signal.Signals(signum).name

    def poll_file(self) -> None:
        """Check for the stop file (rank 0, once per step: one stat) and take it away at once, so that
        neither the rerun nor a longer run started later stops on it."""
        if not self.requested and os.path.exists(self.stop_file):
            self.reason = f"found {self.stop_file}"
            try:
                os.remove(self.stop_file)
            except FileNotFoundError:
                pass
