"""Run control: whether the run goes on after a step, and the clock of its training time.

Two things end a run early, and every rank must see them at the same step: a stop request (a
signal or the stop file, trainer.training.stop) and the time limit (run.time_limit_s, rank 0's
clock decides for all). `RunControl.begin_step` casts both flags, `end_step` reads what the ranks
agreed; the agreement runs on the host (trainer.training.consensus) while the step computes. The
result, with the phase and the step number, is a `StepEnd`: the one thing every periodic action
(log, sample grid, checkpoint, evaluation) looks at to decide whether it is due.
"""

from __future__ import annotations

import time
from typing import NamedTuple

from ..config import PhaseState, RunConfig
from .consensus import HostVote, host_group
from .stop import StopFlag, StopRequested


class StepEnd(NamedTuple):
    """A finished step, as the periodic actions see it: each decides with `due(end)`."""

    step: int
    """The steps done, this one included (the 1-based number of the step just finished)."""
    phase: PhaseState
    """What the phase plan said about this step."""
    last: bool
    """The run ends after this step: run.total_steps reached or run.time_limit_s used up."""
    stop: bool
    """A stop was requested (signal or stop file); the run saves and exits after this step."""
    time_up: bool
    """run.time_limit_s was reached (rank 0's clock, agreed by every rank)."""
    save_now: bool
    """A checkpoint must follow this step: a stop was requested, or a rollback asked for one."""


class RunControl:
    """The stop flag, the time limit and the training clock of one run on this rank."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int):
        """Every rank must build it at the same point: the host group is a collective."""
        self.cfg, self.rank = cfg, rank
        self.stop = StopFlag(cfg.stop_path())
        self.vote = HostVote(host_group(world_size), 2)  # [stop requested, time limit reached]
        self._mark = time.perf_counter()

    def arm(self) -> None:
        """Let signals request a stop from now on (during start-up and resume they end the process
        as usual) and start the training clock."""
        self.stop.install()
        self.restart_clock()

    def restart_clock(self) -> None:
        """Count training time from now (what came since the last lap, e.g. a save or an
        evaluation, was not training)."""
        self._mark = time.perf_counter()

    def lap(self) -> float:
        """Training seconds since the clock last started, and start it again."""
        now = time.perf_counter()
        seconds, self._mark = now - self._mark, now
        return seconds

    def begin_step(self, train_seconds: float) -> None:
        """Cast this rank's flags for the step about to run: rank 0 looks for the stop file (one
        stat) and checks the time limit against `train_seconds` plus the clock's running lap."""
        if self.rank == 0:
            self.stop.poll_file()
        limit = self.cfg.time_limit_s
        over = bool(limit) and self.rank == 0 and train_seconds + time.perf_counter() - self._mark >= limit
        # Acted on at the end of the step: the checkpoint then sits on a step boundary and the data
        # position excludes nothing the step drew, so the rerun continues exactly.
        self.vote.cast([float(self.stop.requested), float(over)])

    def end_step(self) -> tuple[bool, bool]:
        """(stop requested, time limit reached) as every rank agreed for the step just run."""
        stop, time_up = self.vote.result()
        return bool(stop), bool(time_up)

    def stop_requested(self, step: int) -> StopRequested:
        """The exception that ends a run stopped on request after `step`, its checkpoint saved."""
        why = f" ({self.stop.reason})" if self.stop.reason else ""
        return StopRequested(f"stop requested{why}: checkpoint saved at step {step}; rerun the same command to "
                             "resume")

    def time_up_line(self, step: int, train_seconds: float) -> str:
        """The line that says the time limit ended the run."""
        return (f"run.time_limit_s={self.cfg.time_limit_s:g} reached after {step} steps ({train_seconds:.0f}s of "
                "training)")
