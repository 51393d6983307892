"""What the training step does when an update goes wrong: the one object the Trainer asks.

- A skipped update (non-finite gradients on some rank): DeepSpeed's optimizers skip it themselves
  and count it in engine.skipped_steps (a host counter; see engine.skip_nonfinite_updates for
  ZeRO-0 fp32); the step is tried again with new data. fp16's loss-scale search skips too, which
  is routine, not trouble.
- A streak of skipped updates, or a loss spike (losses read on log steps and before saves only):
  the policy (trainer.training.recovery) stops the run or rolls it back.
- A rollback reloads the last checkpoint from before the trouble on every rank, lowers the
  learning rate for a while and asks for a save after the next step.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from deepspeed import DeepSpeedEngine

from ..checkpoints import RunState
from ..config import TrainConfig
from ..console import say, warn
from .checkpointer import Checkpointer
from .engine import loss_scale
from .evaluator import Evaluator
from .monitor import Monitor
from .recovery import Diverged, Recovery, scale_search
from .stop import RunStopped


class Resilience:
    """The skipped-update retry, the spike watch and rollbacks of one run on this rank.

    `save_soon` is set by a rollback: the run saves after its next step, so a crash before the next
    regular save resumes past the rollback (its count, lowered lr, data position and seeds), not
    into the divergence again.
    """

    def __init__(self, cfg: TrainConfig, engine: DeepSpeedEngine, checkpointer: Checkpointer, evaluator: Evaluator,
                 monitor: Monitor, world_size: int, beat: Callable[[str], None]):
        self.cfg, self.engine, self.checkpointer, self.evaluator = cfg, engine, checkpointer, evaluator
        self.monitor, self.world_size, self.beat = monitor, world_size, beat
        self.recovery = Recovery(cfg.monitor, checkpointer.root)
        self.save_soon = False
        self._losses: list = []  # (step, phase, loss on the device), read when spikes are checked

    def resumed(self, state: RunState) -> None:
        """Carry on with a resumed run's rollback count and lowered learning rate."""
        self.recovery.rollbacks, self.recovery.lr_cut_until = state.rollbacks, state.lr_cut_until

    @property
    def rollbacks(self) -> int:
        """Rollbacks so far (they join the per-step seeds: repeated steps draw afresh)."""
        return self.recovery.rollbacks

    def lr_scale(self, step: int) -> float:
        """The learning-rate factor of `step` (1-based): lowered for a while after a rollback."""
        return self.recovery.lr_scale(step)

    def apply(self, attempt: Callable[[int], torch.Tensor], state: RunState, phase: str) -> None:
        """Run `attempt(tries)` (the micro-steps of step state.step + 1, returning its mean loss on
        the device) until its update is applied; each skip is counted in state.nonfinite_skipped.
        Raises Diverged or RunStopped when the policy says so."""
        step = state.step + 1
        fp16 = self.cfg.deepspeed.precision == "fp16"
        tries = 0
        while True:
            skipped_before = self.engine.skipped_steps
            scale_before = loss_scale(self.engine) if fp16 else None
            loss = attempt(tries)
            if self.engine.skipped_steps == skipped_before:
                break
            tries += 1
            self.monitor.drop_step()
            if scale_search(self.cfg.deepspeed.precision, scale_before):
                continue  # fp16's scaler halved its scale (DeepSpeed says so): not a divergence
            state.nonfinite_skipped += 1
            warn(f"non-finite gradients in step {step}: update skipped, trying the step again with new data "
                f"({self.recovery.bad_in_a_row + 1} in a row)")
            self.recovery.nonfinite(step)
        self.recovery.finite()
        if self.cfg.monitor.spike_factor:
            self._losses.append((step, phase, loss))

    def check_spikes(self) -> None:
        """Hand the steps' losses since the last check (the largest over the ranks) to the spike
        watch: called on log steps and before saves only, so a spike is called at the first of
        those after it (a checkpoint is never written while a spike waits to be called)."""
        pending, self._losses = self._losses, []
        if not pending:
            return
        values = torch.stack([loss for _, _, loss in pending]).float()
        if self.world_size > 1:
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        for (step, phase, _), loss in zip(pending, values.tolist()):
            self.recovery.step_loss(step, loss, phase)

    def saved(self) -> None:
        """A checkpoint was written: the save a rollback asked for is done."""
        self.save_soon = False

    def roll_back(self, trouble: Diverged, state: RunState, spent_seconds: float) -> RunState:
        """Go back to the last checkpoint from before the trouble on every rank; returns the run's
        counters from there. The data stream stays where it is, so the batches that led to the
        divergence are not met again; the learning rate is lowered for monitor.rollback_lr_steps
        steps. The spent compute stays counted (train_flops, and train_seconds plus
        `spent_seconds` of the step in progress); steps and images are the checkpoint's. Called
        between steps, so no gradients wait in the engine's accumulation buffers."""
        reached = state.step + 1  # the step in progress (a spike is called at a log step, after its start)
        path = self.checkpointer.latest_before(trouble.first_bad)
        if path is None:
            raise RunStopped(f"{trouble.why}: no checkpoint from before step {trouble.first_bad} to roll back to "
                             f"(checkpoint.every {self.cfg.checkpoint.every}); stopping")
        self.beat(f"rolling back to {path}")
        restored = self.checkpointer.reload(path)
        self.recovery.rolled_back(restored.step)
        restored.nonfinite_skipped = state.nonfinite_skipped
        restored.train_flops, restored.train_seconds = state.train_flops, state.train_seconds + spent_seconds
        restored.rollbacks, restored.lr_cut_until = self.recovery.rollbacks, self.recovery.lr_cut_until
        self.evaluator.rewind(restored.step)
        self.monitor.drop_window()
        self._losses = []
        self.save_soon = True
        m = self.cfg.monitor
        line = (f"rollback {restored.rollbacks} of {m.max_rollbacks}: {trouble.why}; reloaded {path} (step "
                f"{restored.step}); the data of steps {restored.step + 1}-{reached} are skipped; lr "
                f"x{m.rollback_lr_scale:g} through step {restored.lr_cut_until}")
        say(line)
        self.monitor.scalar("recovery/rollbacks", restored.rollbacks, reached)
        self.monitor.scalar("recovery/rolled_back_to", restored.step, reached)
        self.monitor.text("recovery", line, reached)
        return restored
