"""What a run does when its loss diverges: a streak of skipped updates (non-finite gradients), or
(when asked for) a loss far above its running median for several steps in a row. With
`monitor.on_nonfinite: stop` the run stops (status 3, the last checkpoint intact); with `rollback`
it reloads the last checkpoint on every rank, trains on from there with new data and a lower
learning rate for a while, and stops only after `monitor.max_rollbacks` rollbacks.

`Recovery` keeps the policy and the counters; the Trainer carries out a rollback (it owns the data
stream and the engine)."""

from __future__ import annotations

import statistics
from collections import deque
from typing import Deque

from ..config.schema import MonitorConfig
from .stop import RunStopped

SPIKE_WINDOW = 200
"""Steps of the phase whose losses make the running median a spike is measured against."""

FP16_MIN_SCALE = 1.0
"""DeepSpeed's smallest fp16 loss scale (its default min_loss_scale; our JSON does not change it)."""


def scale_search(precision: str, scale_before: float | None, min_scale: float = FP16_MIN_SCALE) -> bool:
    """Whether a skipped update is fp16's loss-scale search, not a divergence: the scaler skips and
    halves its scale on every overflow, which is routine (several in a row at the start of a run)
    until the scale reaches its minimum. Only skips at the minimum scale count towards
    monitor.max_nonfinite."""
    return precision == "fp16" and scale_before is not None and scale_before > min_scale


SPIKE_MIN_HISTORY = 20
"""Steps a phase must have logged before a spike can be called (the first steps fall fast)."""


class Diverged(Exception):
    """Raised on every rank alike (what decides it is the same on every rank): roll back to a
    checkpoint from before step `first_bad`, where the trouble began (a spike is called only after
    several high steps, and a checkpoint saved among them is already off course). Raised between
    steps: no gradients wait in the engine's accumulation buffers."""

    def __init__(self, why: str, step: int, first_bad: int | None = None):
        super().__init__(why)
        self.why, self.step = why, step
        self.first_bad = step if first_bad is None else first_bad


class Recovery:
    """The divergence policy of a run: counts skipped updates in a row and watches for loss
    spikes; `trouble` either raises Diverged (roll back) or RunStopped (stop).

    `rollbacks` and `lr_cut_until` travel in the checkpoint record (RunState), so a resumed run keeps
    counting and keeps its lowered learning rate.
    """

    def __init__(self, cfg: MonitorConfig, root: str, rollbacks: int = 0, lr_cut_until: int = 0):
        self.cfg, self.root = cfg, root
        self.rollbacks, self.lr_cut_until = rollbacks, lr_cut_until
        self.bad_in_a_row = 0
        self._losses: Deque[float] = deque(maxlen=SPIKE_WINDOW)
        self._high_in_a_row = 0
        self._phase: str | None = None

    def lr_scale(self, step: int) -> float:
        """The learning-rate factor for `step` (1-based): rollback_lr_scale for the steps after a
        rollback, else 1."""
        return self.cfg.rollback_lr_scale if step <= self.lr_cut_until else 1.0

    def nonfinite(self, step: int) -> None:
        """Count a skipped update of `step` (non-finite gradients); a streak of max_nonfinite is
        trouble."""
        self.bad_in_a_row += 1
        if self.bad_in_a_row >= self.cfg.max_nonfinite:
            self.trouble(f"{self.bad_in_a_row} updates in a row with non-finite gradients in step {step}", step)

    def finite(self) -> None:
        """An applied update ends a streak."""
        self.bad_in_a_row = 0

    def step_loss(self, step: int, loss: float, phase: str) -> None:
        """Watch the finished step's loss (the largest over the ranks) for a spike: above
        spike_factor x the phase's running median for spike_steps steps in a row. The history starts
        afresh with each phase, whose loss level differs (unmasked steps, another mask ratio)."""
        factor = self.cfg.spike_factor
        if not factor:
            return
        if phase != self._phase:
            self._phase, self._high_in_a_row = phase, 0
            self._losses.clear()
        median = statistics.median(self._losses) if len(self._losses) >= SPIKE_MIN_HISTORY else None
        if median is not None and loss > factor * median:
            self._high_in_a_row += 1  # a spike stays out of the median it is measured against
            if self._high_in_a_row >= self.cfg.spike_steps:
                self.trouble(f"loss above {factor:g} x its running median {median:.4g} for {self._high_in_a_row} "
                             f"steps in a row (step {step}: {loss:.4g})", step, step - self._high_in_a_row + 1)
            return
        self._high_in_a_row = 0
        self._losses.append(loss)

    def trouble(self, why: str, step: int, first_bad: int | None = None) -> None:
        """Roll back (raise Diverged) while the policy allows it, else stop (raise RunStopped)."""
        if self.cfg.on_nonfinite == "rollback" and self.rollbacks < self.cfg.max_rollbacks:
            raise Diverged(why, step, first_bad)
        after = f" after {self.rollbacks} rollback{'s' * (self.rollbacks != 1)}" \
            if self.cfg.on_nonfinite == "rollback" else ""
        raise RunStopped(f"{why}: stopping{after}; the last good checkpoint in {self.root} is intact (lower optim.lr "
                         "or check the data)")

    def rolled_back(self, to_step: int) -> None:
        """Count a rollback to the checkpoint of `to_step` and lower the learning rate after it."""
        self.rollbacks += 1
        self.lr_cut_until = to_step + self.cfg.rollback_lr_steps
        self.bad_in_a_row, self._high_in_a_row = 0, 0
