"""The training run: a `Trainer` built once from a launch config owns the engine, the EMA, the data
stream, the phase plan, the monitor, the sample grids, the checkpointer and the evaluator, plus
two helpers that keep the step short: `RunControl` (stop requests, the time limit, the training
clock) and `Resilience` (skipped updates, loss spikes, rollbacks). `train()` steps through the plan;
after each step every periodic action decides with `due(end)` whether it acts. Resume is rerunning
the same command."""

from __future__ import annotations

from typing import Callable

import torch

from model_zoo.layers import canonical_mask_ratio, kept_token_count
from model_zoo.registry import build_model

from ..checkpoints import RunState, read_record
from ..config import PRECISIONS, PhasePlan, PhaseState, TrainConfig, TrainingFlops
from ..config.phases import MASKED
from ..console import say
from ..distributed import DistInfo
from .checkpointer import Checkpointer, resume_target
from .data import LatentLoader, TimedBatches, build_latent_loader
from .ema import EMA, ShardedEMA
from .engine import build_engine, compiled_graphs, deepspeed_config, seed_step
from .evaluator import build_evaluator
from .init_from import apply_init, read_source
from .monitor import Monitor, measure_peak_flops
from .previews import SampleGrids
from .recovery import Diverged
from .resilience import Resilience
from .run_control import RunControl, StepEnd
from .task import TrainingModule, build_network


def dataset_summary(loader: LatentLoader) -> dict:
    """What sampling needs to know about the training data: shapes, classes, how to decode."""
    m = loader.manifest
    return {"latent_shape": list(m.spec.shape), "num_classes": m.num_classes, "scaling_factor": m.scaling_factor,
            "encoder": m.encoder, "resolution": m.resolution, "class_names": m.source.get("class_names")}


def training_stream(cfg: TrainConfig, rank: int, world_size: int) -> LatentLoader:
    """This rank's share of the training shards (held-out shards and the data.val_fraction share
    stay out), with teacher features when the run aligns."""
    d = cfg.data
    return build_latent_loader(d.shards, d.micro_batch_size, rank, world_size, num_workers=d.num_workers,
                               seed=cfg.run.seed, shuffle_buffer=d.shuffle_buffer, hflip=d.hflip,
                               epoch_samples=d.epoch_samples, manifest=d.manifest,
                               holdout_fraction=0.0 if d.val_shards else d.val_fraction, features=cfg.align.enabled)


def _no_beat(what: str) -> None:
    pass


class Trainer:
    """One training run on this rank; `train()` runs (or resumes) it to run.total_steps.

    `beat(what)` is called at every sign of progress with the work that follows (see
    trainer.training.watchdog.StallWatchdog).
    """

    def __init__(self, cfg: TrainConfig, dist_info: DistInfo, beat: Callable[[str], None] = _no_beat):
        self.cfg, self.dist, self.beat = cfg, dist_info, beat
        rank, world, device = dist_info.rank, dist_info.world_size, dist_info.device
        beat("opening the data shards")
        self.loader = training_stream(cfg, rank, world)
        manifest = self.loader.manifest
        latent_shape = tuple(manifest.spec.shape)
        kwargs = cfg.model_kwargs(latent_shape, manifest.num_classes)
        self.resume_from = resume_target(cfg, world)
        features = manifest.feature_spec if cfg.align.enabled else None
        feature_shape = (features.shape[0], features.shape[-1]) if features is not None else None
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        beat("building the engine")
        self.engine = build_engine(lambda: TrainingModule(build_network(cfg, kwargs), cfg, feature_shape),
                                   deepspeed_config(cfg, world), rank, cfg.model.compile, cfg.model.compile_backend,
                                   cfg.phases.schedule_levels + 2, self._init_weights())
        self.net = self.engine.module.net
        self._graphs = compiled_graphs()
        shadow = build_model(cfg.model.name, **kwargs).to(device)
        self.ema = ShardedEMA(shadow, cfg.ema, cfg.data.batch_size, self.net) \
            if cfg.deepspeed.zero_stage == 3 else EMA(shadow, cfg.ema, cfg.data.batch_size)
        self.ema.copy_from(self.net)
        self.plan = PhasePlan.from_config(cfg)
        self.flops = TrainingFlops(cfg, latent_shape, manifest.num_classes, feature_shape and feature_shape[0])
        peak = cfg.monitor.peak_tflops * 1e12 if cfg.monitor.peak_tflops else \
            measure_peak_flops(device, PRECISIONS[cfg.deepspeed.precision])
        self.monitor = Monitor(cfg.monitor, cfg.run.run_dir(), rank, cfg.run.total_steps, device, peak)
        self.grids = SampleGrids(cfg, self.ema, manifest, latent_shape, device, self.monitor)
        self.checkpointer = Checkpointer(cfg, self.engine, self.ema, self.loader, rank, world, kwargs,
                                         dataset_summary(self.loader))
        beat("preparing the evaluation")
        resumed_step = read_record(self.resume_from).step if self.resume_from else 0
        self.evaluator = build_evaluator(cfg, dist_info, self.ema, self.loader, self.monitor, resumed_step)
        self.control = RunControl(cfg.run, rank, world)
        self.resilience = Resilience(cfg, self.engine, self.checkpointer, self.evaluator, self.monitor, world, beat)
        self.state = RunState()

    def _init_weights(self) -> Callable[[torch.nn.Module], None] | None:
        """The model.init_from step of building the engine, or None (no init_from, or resuming)."""
        cfg = self.cfg
        if not cfg.model.init_from:
            return None
        if self.resume_from:
            say(f"model.init_from ignored: resuming from {self.resume_from}")
            return None
        self.beat(f"reading model.init_from {cfg.model.init_from}")
        return lambda net: say(apply_init(net, read_source(cfg)).line())

    # ------------------------------------------------------------------------- the run

    def train(self) -> RunState:
        """Run the plan from the latest checkpoint (or the start) to the end; returns the counters."""
        total = self.cfg.run.total_steps
        batches = None
        try:
            self._start()
            batches = self.loader.batches()
            self.control.arm()  # stop signals count from here (before, they end the process as usual)
            while self.state.step < total:
                self.beat(f"step {self.state.step + 1}")
                try:
                    end = self._step(batches, self.plan.at(self.state.step))
                except Diverged as trouble:
                    self.state = self.resilience.roll_back(trouble, self.state, self.control.lap())
                    continue
                self._after_step(end)
                if end.time_up:
                    say(self.control.time_up_line(end.step, self.state.train_seconds))
                    break
                if end.stop and end.step < total:
                    raise self.control.stop_requested(end.step)
            self._finish()
        finally:
            if batches is not None:
                batches.close()  # now, not when a traceback lets go of it: its data workers stop
            self.monitor.close()
            self._release_engine()
        return self.state

    def _step(self, batches: TimedBatches, phase: PhaseState) -> StepEnd:
        """One optimizer step: its micro-steps, tried again with new data while the update is skipped
        (Resilience), the stop and time-limit flags agreed while it computes (RunControl), the spike
        watch before any log or save, then the step counted. Reads nothing from the device outside
        log and save steps. Raises Diverged (every rank alike) when the run must roll back."""
        step = self.state.step + 1
        self.control.begin_step(self.state.train_seconds)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = self._lr(phase, step)
        try:
            self.resilience.apply(lambda attempt: self._micro_steps(batches, phase, step, attempt), self.state,
                                  phase.phase)
        finally:
            stop, time_up = self.control.end_step()
        if self.cfg.model.compile:
            self._note_compiles(phase)
        end = StepEnd(step, phase, last=step == self.cfg.run.total_steps or time_up, stop=stop, time_up=time_up,
                      save_now=stop or self.resilience.save_soon)
        if self.monitor.due(end) or self.checkpointer.due(end):
            self.resilience.check_spikes()  # before the step counts: no save while a spike waits to be called
        self._account(phase, batches.waited())
        return end

    def _micro_steps(self, batches: TimedBatches, phase: PhaseState, step: int, attempt: int) -> torch.Tensor:
        """Forward, backward and optimizer step of each micro-batch of `step` (its `attempt`-th try);
        returns the step's mean loss, left on the device. Every RNG is seeded per micro-step, so a
        resumed run draws what the uninterrupted one drew."""
        accumulation = self.cfg.accumulation_steps(self.dist.world_size)
        ratio = canonical_mask_ratio(self.net.num_tokens, phase.mask_ratio)  # one float per kept-token count
        total = None
        for micro in range(accumulation):
            batch = next(batches).to(self.dist.device)
            seed_step(self.cfg.run.seed, self.dist.rank, step - 1, attempt * accumulation + micro,
                      self.resilience.rollbacks)
            out = self.engine(batch.latents, batch.labels, ratio, batch.features)
            loss = out.loss.mean()
            self.engine.backward(loss)
            self.engine.step()
            self.monitor.record(out)
            total = loss.detach() if total is None else total + loss.detach()
        return total / accumulation

    def _after_step(self, end: StepEnd) -> None:
        """The EMA update and the periodic actions, each when it is due; their time is not training."""
        self.ema.step_done(end.step, self.net, self.state.images_seen)
        if self.monitor.due(end):
            self._log(end.phase)
        if self.grids.due(end):
            self.beat(f"the sample grid at step {end.step}")
            self._grid(end.step)
        if self.checkpointer.due(end):
            self.beat(f"saving the checkpoint of step {end.step}")
            self.checkpointer.save(self.state, end.phase.phase if end.phase.phase_end else None)
            self.resilience.saved()
        if self.evaluator.due(end):
            self.beat(f"the evaluation at step {end.step}")
            self.evaluator.run(self.state, end.phase.phase, final=end.last)
        self.control.restart_clock()

    # ------------------------------------------------------------------------- start and end

    def _start(self) -> None:
        """Resume from the latest checkpoint, or record the config and the plan of a new run."""
        if self.resume_from:
            self.beat(f"resuming from {self.resume_from}")
            self.state = self.checkpointer.resume(self.resume_from)
            self.resilience.resumed(self.state)
        elif self.dist.rank == 0:
            self.monitor.text("config", f"```\n{self.cfg.to_dict()}\n```")
            self.monitor.text("phase_plan", f"```\n{self.plan.table()}\n```")

    def _finish(self) -> None:
        """The final evaluation when a resumed run lacks it, and the final sample grid."""
        total = self.cfg.run.total_steps
        if self.state.step >= total and self.evaluator.final_missing(self.state.step):
            self.beat("the final evaluation")  # resumed at the end: the last attempt died before it
            self.evaluator.run(self.state, self.plan.at(total - 1).phase, final=True)
        self.beat("the final sample grid")
        self._grid(self.state.step)

    def _grid(self, step: int) -> None:
        with self.ema.full(to_rank=0) as net:  # every rank: under ZeRO-3 the shards go to rank 0
            if net is not None:
                self.grids.make(step)

    def _release_engine(self) -> None:
        try:
            self.engine.destroy()
        except Exception as err:  # noqa: BLE001 - teardown must not hide the run's own error
            say(f"warning: releasing the DeepSpeed engine failed: {type(err).__name__}: {err}", every_rank=True)

    # ------------------------------------------------------------------------- per-step details

    def _lr(self, phase: PhaseState, step: int) -> float:
        """The learning rate of `step` (1-based): the plan's, lowered after a rollback."""
        return self.cfg.optim.lr * phase.lr_scale * self.resilience.lr_scale(step)

    def _note_compiles(self, phase: PhaseState) -> None:
        graphs = compiled_graphs()
        if graphs != self._graphs:
            n = self.net.num_tokens
            kept = kept_token_count(n, canonical_mask_ratio(n, phase.mask_ratio))
            say(f"torch.compile: {graphs} graphs after step {self.state.step + 1} (new: mask ratio "
                f"{phase.mask_ratio:g}, {kept} of {n} tokens kept)")
        self._graphs = graphs

    def _account(self, phase: PhaseState, data_wait: float) -> None:
        """Count the finished step: images, training FLOPs and wall time (the run's own counters and
        the monitor's window)."""
        batch = self.cfg.data.batch_size
        flops = self.flops(phase.mask_ratio) * batch
        self.state.step += 1
        self.state.images_seen += batch
        self.state.train_flops += flops
        self.state.train_seconds += self.control.lap()
        self.monitor.step_done(batch // self.dist.world_size, flops / self.dist.world_size, data_wait,
                               self.loader.skipped)

    def _log(self, phase: PhaseState) -> None:
        norm = self.engine.get_global_grad_norm()
        self.monitor.log(self.state.step, {
            "lr": self._lr(phase, self.state.step), "mask_ratio": phase.mask_ratio,
            "grad_norm": float(norm) if norm is not None else float("nan"),
            "skipped_steps": float(self.state.nonfinite_skipped), "phase_unmask": float(phase.phase != MASKED),
        }, self.dist.world_size, phase.phase)
