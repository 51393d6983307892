"""The training plan: a pure function step -> (mask ratio, lr scale, phase).

Layout over run.total_steps = T with final_unmask_steps = F, unmask_every = K, unmask_steps = M:

    [0, T - F)   masked training; inside it, the last M steps of every K-step block are a
                 periodic unmask-tuning phase (mask ratio 0, lr x unmask_lr_scale)
    [T - F, T)   final unmask tuning (mask ratio 0, lr x final_unmask_lr_scale)

Masked steps follow the mask-ratio schedule (constant, linear or cosine from mask_ratio to
end_mask_ratio over [0, T - F)). The lr schedule (a linear warm-up over optim.warmup_steps, then
constant, or a linear or cosine decay to optim.min_lr at the last step) multiplies every phase's
scale. Being a pure function of the step, the plan resumes correctly in the middle of any phase.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Tuple

from .schema import PhasesConfig

if TYPE_CHECKING:
    from .schema import TrainConfig

MASKED, UNMASK, FINAL = "masked", "unmask", "final_unmask"

MASK_SCHEDULES: Dict[str, Callable[[float], float]] = {
    "constant": lambda frac: 0.0,
    "linear": lambda frac: frac,
    "cosine": lambda frac: 0.5 * (1 - math.cos(math.pi * frac)),
}
"""phases.schedule: name -> the share (0 -> 1) of the way from mask_ratio to end_mask_ratio at a
fraction of the masked steps."""

LR_SCHEDULES = MASK_SCHEDULES
"""optim.lr_schedule: the same shapes, as the share of the way from the peak lr to optim.min_lr at
a fraction of the steps after the warm-up (constant: no decay)."""


@dataclass(frozen=True)
class PhaseState:
    """What the plan says about one step (0-based)."""

    mask_ratio: float
    lr_scale: float
    phase: str
    phase_end: bool
    """True on the last step of an unmask-tuning phase (a checkpoint is due after it)."""


class PhasePlan:
    """The plan for one run; `at(step)` is cheap and pure."""

    def __init__(self, cfg: PhasesConfig, total_steps: int, warmup_steps: int = 0, lr_schedule: str = "constant",
                 min_lr_ratio: float = 0.0):
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"optim.lr_schedule: unknown schedule {lr_schedule!r}")
        self.cfg = cfg
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.lr_schedule, self.min_lr_ratio = lr_schedule, min_lr_ratio
        self.masked_end = total_steps - cfg.final_unmask_steps

    @classmethod
    def from_config(cls, cfg: TrainConfig, total_steps: int | None = None) -> PhasePlan:
        """The plan of a launch config: its phases, warm-up and lr schedule over run.total_steps (or
        `total_steps`, e.g. a study's budget laid over another length)."""
        o = cfg.optim
        return cls(cfg.phases, cfg.run.total_steps if total_steps is None else total_steps, o.warmup_steps,
                   o.lr_schedule, o.min_lr / o.lr if o.lr > 0 else 0.0)

    def _phase(self, step: int) -> Tuple[str, bool]:
        c = self.cfg
        if step >= self.masked_end:
            return FINAL, step == self.total_steps - 1
        if c.unmask_every and c.unmask_steps and step % c.unmask_every >= c.unmask_every - c.unmask_steps:
            end = step % c.unmask_every == c.unmask_every - 1 or step == self.masked_end - 1
            return UNMASK, end
        return MASKED, False

    def scheduled_ratio(self, step: int) -> float:
        """Mask ratio of the schedule at this step (what a masked step uses)."""
        c = self.cfg
        if c.end_mask_ratio is None:
            return c.mask_ratio
        if c.schedule not in MASK_SCHEDULES:
            raise ValueError(f"phases.schedule: unknown schedule {c.schedule!r}")
        w = MASK_SCHEDULES[c.schedule](min(1.0, step / max(1, self.masked_end - 1)))
        if c.schedule_levels:  # a few distinct ratios: a compiled network recompiles per token count
            w = round(w * c.schedule_levels) / c.schedule_levels
        return c.mask_ratio + (c.end_mask_ratio - c.mask_ratio) * w

    def lr_factor(self, step: int) -> float:
        """The lr schedule's factor at a step (warm-up, then decay), before the phase's scale."""
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return 1.0
        span = max(1, self.total_steps - 1 - self.warmup_steps)
        way = LR_SCHEDULES[self.lr_schedule](min(1.0, (step - self.warmup_steps) / span))
        return 1.0 - (1.0 - self.min_lr_ratio) * way

    def at(self, step: int) -> PhaseState:
        """Mask ratio, lr scale and phase of a step in [0, total_steps)."""
        if not 0 <= step < self.total_steps:
            raise ValueError(f"step {step} outside the plan of {self.total_steps} steps")
        phase, end = self._phase(step)
        warm = self.lr_factor(step)
        if phase == MASKED:
            return PhaseState(self.scheduled_ratio(step), warm, phase, False)
        scale = self.cfg.unmask_lr_scale if phase == UNMASK else self.cfg.final_unmask_lr_scale
        return PhaseState(0.0, warm * scale, phase, end)

    def segments(self) -> List[Tuple[int, int, str, float, float, float]]:
        """Maximal runs of steps in one phase: (first, last, phase, ratio first, ratio last, lr scale).

        The lr scale shown excludes the lr schedule (warm-up and decay).
        """
        c = self.cfg
        cuts = {0, self.masked_end, self.total_steps}
        if c.unmask_every and c.unmask_steps:
            for block in range(0, self.masked_end, c.unmask_every):
                cuts.update({block, min(block + c.unmask_every - c.unmask_steps, self.masked_end)})
        bounds = sorted(b for b in cuts if 0 <= b <= self.total_steps)
        out = []
        for first, stop in zip(bounds, bounds[1:]):
            if stop <= first:
                continue
            phase, _ = self._phase(first)
            a, b = self.at(first), self.at(stop - 1)
            scale = 1.0 if phase == MASKED else (c.unmask_lr_scale if phase == UNMASK else c.final_unmask_lr_scale)
            out.append((first, stop - 1, phase, a.mask_ratio, b.mask_ratio, scale))
        return out

    def table(self, max_rows: int = 12) -> str:
        """Human-readable plan for --dry-run and the run log."""
        rows = self.segments()
        lines = [f"{'steps':>23}  {'phase':<13}{'mask ratio':>17}{'lr x':>7}"]
        shown = rows if len(rows) <= max_rows else rows[: max_rows - 2] + [None] + rows[-1:]
        for row in shown:
            if row is None:
                lines.append(f"{'...':>23}  ({len(rows) - max_rows + 1} more segments, the pattern repeats "
                             f"every {self.cfg.unmask_every} steps)")
                continue
            first, last, phase, r0, r1, scale = row
            ratio = f"{r0:.3f}" if abs(r0 - r1) < 1e-9 else f"{r0:.3f} -> {r1:.3f}"
            lines.append(f"{first:>10} - {last:>10}  {phase:<13}{ratio:>17}{scale:>7.2f}")
        lines.append(self.lr_line())
        return "\n".join(lines)

    def lr_line(self) -> str:
        """The lr schedule in words, with its factor at a few steps (for --dry-run)."""
        warm = f"linear warm-up over the first {self.warmup_steps} steps, then " if self.warmup_steps else ""
        shape = "constant" if self.lr_schedule == "constant" else \
            f"{self.lr_schedule} decay to x{self.min_lr_ratio:g} at the last step"
        last = self.total_steps - 1
        steps = sorted({0, min(self.warmup_steps, last), min((self.warmup_steps + last) // 2, last), last})
        at = ", ".join(f"{s}: {self.lr_factor(s):.3g}" for s in steps)
        return f"lr schedule: {warm}{shape} (x phase scale; factor at step {at})"
