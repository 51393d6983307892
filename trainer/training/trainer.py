"""The training run: a `Trainer` built once from a launch config owns the engine, the EMA, the data
stream, the phase plan, the monitor, the sample grids and the checkpointer; `train()` steps through
the plan and lets each component decide when it acts. Resume is rerunning the same command."""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from model_zoo.flops import FlopsPerImage
from model_zoo.layers import canonical_mask_ratio, kept_token_count
from model_zoo.registry import build_model

from ..config import PRECISIONS, PhaseState, TrainConfig
from ..config.phases import MASKED
from ..distributed import DistInfo
from .checkpointer import Checkpointer, RunState, resume_target
from .consensus import HostVote, host_group
from .data import LatentLoader, build_latent_loader
from .ema import EMA, ShardedEMA
from .engine import build_engine, compiled_graphs, deepspeed_config, loss_scale, seed_step
from .evaluator import Evaluator, build_evaluator
from .init_from import apply_init, read_source
from .monitor import Monitor, measure_peak_flops
from .previews import SampleGrids
from .recovery import Diverged, Recovery, scale_search
from .stop import RunStopped, StopFlag, StopRequested
from .task import TrainingModule, build_network


def dataset_summary(loader: LatentLoader) -> dict:
    """What sampling needs to know about the training data: shapes, classes, how to decode."""
    m = loader.manifest
    return {"latent_shape": list(m.spec.shape), "num_classes": m.num_classes, "scaling_factor": m.scaling_factor,
            "encoder": m.encoder, "resolution": m.resolution, "class_names": m.source.get("class_names")}


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
        d = cfg.data
        beat("opening the data shards")
        holdout = 0.0 if d.val_shards else d.val_fraction  # held-out shards stay out of training
        self.loader = build_latent_loader(d.shards, d.micro_batch_size, rank, world, num_workers=d.num_workers,
                                          seed=cfg.run.seed, shuffle_buffer=d.shuffle_buffer, hflip=d.hflip,
                                          epoch_samples=d.epoch_samples, manifest=d.manifest, holdout_fraction=holdout,
                                          features=cfg.align.enabled)
        latent_shape = tuple(self.loader.manifest.spec.shape)
        kwargs = cfg.model_kwargs(latent_shape, self.loader.manifest.num_classes)
        self.resume_from = resume_target(cfg, world)
        ds_config = deepspeed_config(cfg, world)  # universal or not is set per load (checkpointer)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        beat("building the engine")
        spec = self.loader.manifest.feature_spec if cfg.align.enabled else None
        feature_shape = (spec.shape[0], spec.shape[-1]) if spec is not None else None
        self.engine = build_engine(lambda: TrainingModule(build_network(cfg, kwargs), cfg, feature_shape),
                                   ds_config, rank,
                                   cfg.model.compile, cfg.model.compile_backend, cfg.phases.schedule_levels + 2,
                                   self._init_weights())
        self.num_tokens = self.engine.module.net.num_tokens
        self._graphs = compiled_graphs()
        shadow = build_model(cfg.model.name, **kwargs).to(device)
        self.ema = ShardedEMA(shadow, cfg.ema, d.batch_size, self.engine.module.net) \
            if cfg.deepspeed.zero_stage == 3 else EMA(shadow, cfg.ema, d.batch_size)
        self.ema.copy_from(self.engine.module.net)
        self.plan = cfg.phase_plan()
        self.flops = FlopsPerImage(cfg.model.name, kwargs)
        head = self.engine.module.align_head
        self.align_flops = head.flops_per_token() if head is not None else 0.0  # per kept token
        peak = cfg.monitor.peak_tflops * 1e12 if cfg.monitor.peak_tflops else \
            measure_peak_flops(device, PRECISIONS[cfg.deepspeed.precision])
        self.monitor = Monitor(cfg.monitor, cfg.run.run_dir(), rank, cfg.run.total_steps, device, peak)
        self.grids = SampleGrids(cfg, self.ema, self.loader.manifest, latent_shape, device, self.monitor)
        self.checkpointer = Checkpointer(cfg, self.engine, self.ema, self.loader, rank, world, kwargs,
                                         dataset_summary(self.loader))
        self.stop: StopFlag | None = None  # installed once training starts (after resume)
        self.evaluator: Evaluator | None = None  # built after resume (it drops records of a lost attempt)
        self.state = RunState()
        self.recovery: Recovery | None = None  # built after resume, from the resumed counters
        self._save_soon = False  # a save after the next step (set by a rollback)
        self.vote = HostVote(host_group(world), 2)  # [stop requested, time limit reached], agreed each step
        self._step_losses: list = []  # (step, phase, loss on the device) for the spike watch, read on log steps
        self._mark = time.perf_counter()  # training time counts from here; saves and evaluations do not

    def _init_weights(self) -> Optional[Callable[[torch.nn.Module], None]]:
        """The model.init_from step of building the engine, or None (no init_from, or resuming)."""
        cfg, rank = self.cfg, self.dist.rank
        if not cfg.model.init_from:
            return None
        if self.resume_from:
            if rank == 0:
                print(f"model.init_from ignored: resuming from {self.resume_from}", flush=True)
            return None
        self.beat(f"reading model.init_from {cfg.model.init_from}")

        def load(net: torch.nn.Module) -> None:
            plan = apply_init(net, read_source(cfg))
            if rank == 0:
                print(plan.line(), flush=True)

        return load

    def train(self) -> RunState:
        """Run the plan from the latest checkpoint (or the start) to the end; returns the counters."""
        cfg, rank = self.cfg, self.dist.rank
        batches = None
        try:
            self._start()
            # Signals count from here: during start-up and resume they end the process as usual.
            self.stop = StopFlag(cfg.run.stop_path())
            batches = self.loader.batches()
            self._mark = time.perf_counter()
            while self.state.step < cfg.run.total_steps:
                self.beat(f"step {self.state.step + 1}")
                phase = self.plan.at(self.state.step)
                try:
                    stopping, time_up, data_wait = self._step(batches, phase)
                except Diverged as trouble:
                    self._roll_back(trouble)
                    continue
                self._account(phase, data_wait)
                step = self.state.step
                last = step == cfg.run.total_steps or time_up
                self.ema.step_done(step, self.engine.module.net, self.state.images_seen)
                if self.monitor.due(step) or last:
                    self._log(phase)
                if self.grids.due(step) and not last:
                    self.beat(f"the sample grid at step {step}")
                    self._grid(step)
                if self.checkpointer.due(step, phase, stopping or last or self._save_soon):
                    self._save_soon = False
                    self.beat(f"saving the checkpoint of step {step}")
                    self.checkpointer.save(self.state, phase.phase if phase.phase_end else None)
                if self.evaluator.due(step, phase, last):
                    self.beat(f"the evaluation at step {step}")
                    self.evaluator.run(self.state, phase.phase, final=last)
                self._mark = time.perf_counter()  # the save and the evaluation were not training
                if time_up:
                    if rank == 0:
                        print(f"run.time_limit_s={cfg.run.time_limit_s:g} reached after {step} steps "
                              f"({self.state.train_seconds:.0f}s of training)", flush=True)
                    break
                if stopping and step < cfg.run.total_steps:
                    why = f" ({self.stop.reason})" if self.stop.reason else ""
                    raise StopRequested(f"stop requested{why}: checkpoint saved at step {step}; rerun the same "
                                        "command to resume")
            if self.state.step >= cfg.run.total_steps and self.evaluator.final_missing(self.state.step):
                self.beat("the final evaluation")  # resumed at the end: the last attempt died before it
                self.evaluator.run(self.state, self.plan.at(cfg.run.total_steps - 1).phase, final=True)
            self.beat("the final sample grid")
            self._grid(self.state.step)
        finally:
            if batches is not None:
                # Now, not when an exception's traceback lets go of it: closing the stream tells
                # its data workers to stop.
                batches.close()
            self.monitor.close()
            self._release_engine()
        return self.state

    def _grid(self, step: int) -> None:
        with self.ema.full(to_rank=0) as net:  # every rank: under ZeRO-3 the shards go to rank 0
            if net is not None:
                self.grids.make(step)

    def _release_engine(self) -> None:
        try:
            self.engine.destroy()
        except Exception as err:  # noqa: BLE001 - teardown must not hide the run's own error
            print(f"warning: releasing the DeepSpeed engine failed: {type(err).__name__}: {err}", flush=True)

    def _start(self) -> None:
        if self.resume_from:
            self.beat(f"resuming from {self.resume_from}")
            self.state = self.checkpointer.resume(self.resume_from)
        elif self.dist.rank == 0:
            self.monitor.text("config", f"```\n{self.cfg.to_dict()}\n```")
            self.monitor.text("phase_plan", f"```\n{self.plan.table()}\n```")
        self.recovery = Recovery(self.cfg.monitor, self.checkpointer.root, self.state.rollbacks,
                                 self.state.lr_cut_until)
        self.beat("preparing the evaluation")
        self.evaluator = build_evaluator(self.cfg, self.dist, self.ema, self.loader, self.monitor, self.state.step)

    def _step(self, batches, phase: PhaseState):
        """One optimizer step of `accumulation` micro-steps, tried again with new data while its
        update is skipped: DeepSpeed's optimizers skip an update whose gradients are not finite on
        some rank and count it in engine.skipped_steps (a host counter: their own check has read the
        device already; see engine.skip_nonfinite_updates for ZeRO-0 fp32). The loop itself reads
        nothing from the device: losses wait there for a log step, and the stop and time-limit flags
        are agreed on the host while the step computes. Returns (stop requested, time limit reached
        (rank 0's clock decides for all), seconds waited for data); raises Diverged (every rank
        alike) when the run must roll back."""
        cfg, rank = self.cfg, self.dist.rank
        if rank == 0:
            self.stop.poll_file()
        step = self.state.step + 1
        for group in self.engine.optimizer.param_groups:
            group["lr"] = self._lr(phase, step)
        limit = cfg.run.time_limit_s
        over = bool(limit) and rank == 0 and self.state.train_seconds + time.perf_counter() - self._mark >= limit
        # Acted on at the end of the step: the checkpoint then sits on a step boundary and the data
        # position excludes nothing the step drew, so the rerun continues exactly.
        self.vote.cast([float(self.stop.requested), float(over)])
        try:
            data_wait = self._try_until_applied(batches, phase, step)
        finally:
            stop_now, out_of_time = self.vote.result()
        if self.cfg.model.compile:
            self._note_compiles(phase)
        stopping, time_up = bool(stop_now), bool(out_of_time)
        # On log steps, and before any save: a checkpoint must not be written (and become the one a
        # rollback returns to, or rotate the last good one away) while a spike waits to be called.
        if self.monitor.due(step) or time_up or self.checkpointer.due(step, phase, stopping or self._save_soon):
            self._check_spikes()
        return stopping, time_up, data_wait

    def _try_until_applied(self, batches, phase: PhaseState, step: int) -> float:
        """Run the micro-steps of `step` until its update is applied; returns the seconds spent
        waiting for data."""
        accumulation = self.cfg.accumulation_steps(self.dist.world_size)
        ratio = canonical_mask_ratio(self.num_tokens, phase.mask_ratio)  # same float for the same token count
        data_wait, tries = 0.0, 0
        fp16 = self.cfg.deepspeed.precision == "fp16"
        while True:
            skipped_before, step_loss = self.engine.skipped_steps, None
            scale_before = loss_scale(self.engine) if fp16 else None
            for micro in range(accumulation):
                start = time.perf_counter()
                z, y, *features = next(batches)  # features: the teacher's, when aligning
                data_wait += time.perf_counter() - start
                z, y = z.to(self.dist.device, non_blocking=True), y.to(self.dist.device, non_blocking=True)
                features = [f.to(self.dist.device, non_blocking=True) for f in features]
                seed_step(self.cfg.run.seed, self.dist.rank, step - 1, tries * accumulation + micro,
                          self.recovery.rollbacks)
                out = self.engine(z, y, ratio, *features)
                loss = out.loss.mean()
                self.engine.backward(loss)
                self.engine.step()
                self.monitor.record(out)
                step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
            if self.engine.skipped_steps == skipped_before:
                break
            tries += 1
            self.monitor.drop_step()
            if scale_search(self.cfg.deepspeed.precision, scale_before):
                continue  # fp16's scaler halved its scale (DeepSpeed says so): not a divergence
            self._skip_nonfinite(step)
        self.recovery.finite()
        if self.cfg.monitor.spike_factor:
            self._step_losses.append((step, phase.phase, step_loss / accumulation))
        return data_wait

    def _check_spikes(self) -> None:
        """Hand the steps' losses since the last check (the largest over the ranks) to the spike
        watch: read on log steps and before saves only, so a spike is called at the first of those
        after it."""
        pending, self._step_losses = self._step_losses, []
        if not pending:
            return
        values = torch.stack([loss for _, _, loss in pending]).float()
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
        for (step, phase, _), loss in zip(pending, values.tolist()):
            self.recovery.step_loss(step, loss, phase)

    def _note_compiles(self, phase: PhaseState) -> None:
        graphs = compiled_graphs()
        if graphs != self._graphs and self.dist.rank == 0:
            kept = kept_token_count(self.num_tokens, canonical_mask_ratio(self.num_tokens, phase.mask_ratio))
            print(f"torch.compile: {graphs} graphs after step {self.state.step + 1} (new: mask ratio "
                  f"{phase.mask_ratio:g}, {kept} of {self.num_tokens} tokens kept)", flush=True)
        self._graphs = graphs

    def _lr(self, phase: PhaseState, step: int) -> float:
        """The learning rate of `step` (1-based): the plan's, lowered after a rollback."""
        return self.cfg.optim.lr * phase.lr_scale * self.recovery.lr_scale(step)

    def _skip_nonfinite(self, step: int) -> None:
        self.state.nonfinite_skipped += 1
        if self.dist.rank == 0:
            print(f"warning: non-finite gradients in step {step}: update skipped, trying the step again with new "
                  f"data ({self.recovery.bad_in_a_row + 1} in a row)", flush=True)
        self.recovery.nonfinite(step)

    def _roll_back(self, trouble: Diverged) -> None:
        """Go back to the last checkpoint from before the trouble on every rank. The data stream
        stays where it is, so the batches that led to the divergence are not met again; the learning
        rate is lowered for monitor.rollback_lr_steps steps. The spent compute stays counted
        (train_flops, train_seconds); steps and images are the checkpoint's. Called between steps
        (Diverged comes after a step's update was applied or skipped), so no gradients wait in the
        engine's accumulation buffers."""
        spent_flops = self.state.train_flops
        spent_seconds = self.state.train_seconds + time.perf_counter() - self._mark
        reached = self.state.step + 1  # the step in progress (a spike is called at a log step, after its start)
        path = self.checkpointer.latest_before(trouble.first_bad)
        if path is None:
            raise RunStopped(f"{trouble.why}: no checkpoint from before step {trouble.first_bad} to roll back to "
                             f"(checkpoint.every {self.cfg.checkpoint.every}); stopping")
        self.beat(f"rolling back to {path}")
        state = self.checkpointer.reload(path)
        self.recovery.rolled_back(state.step)
        state.nonfinite_skipped = self.state.nonfinite_skipped
        state.train_flops, state.train_seconds = spent_flops, spent_seconds
        state.rollbacks, state.lr_cut_until = self.recovery.rollbacks, self.recovery.lr_cut_until
        self.evaluator.rewind(state.step)
        self.monitor.drop_window()
        self._step_losses = []
        # Saved after the next step: a crash before the next regular save then resumes past the
        # rollback (its count, lowered lr, data position and seeds), not into the divergence again.
        self._save_soon = True
        if self.dist.rank == 0:
            line = (f"rollback {state.rollbacks} of {self.cfg.monitor.max_rollbacks}: {trouble.why}; reloaded {path} "
                    f"(step {state.step}); the data of steps {state.step + 1}-{reached} are skipped; lr x"
                    f"{self.cfg.monitor.rollback_lr_scale:g} through step {state.lr_cut_until}")
            print(line, flush=True)
            self.monitor.scalar("recovery/rollbacks", state.rollbacks, reached)
            self.monitor.scalar("recovery/rolled_back_to", state.step, reached)
            self.monitor.text("recovery", line, reached)
        self.state = state
        self._mark = time.perf_counter()

    def _account(self, phase: PhaseState, data_wait: float) -> None:
        """Count the finished step: images, training FLOPs and wall time (the run's own counters and
        the monitor's window)."""
        batch = self.cfg.data.batch_size
        flops = self.flops(phase.mask_ratio) * batch
        if self.align_flops:  # the alignment head trains on the kept tokens (its teacher costs nothing here)
            flops += self.align_flops * kept_token_count(self.num_tokens, phase.mask_ratio) * batch
        now = time.perf_counter()
        self.state.step += 1
        self.state.images_seen += batch
        self.state.train_flops += flops
        self.state.train_seconds += now - self._mark
        self._mark = now
        per_rank = batch // self.dist.world_size
        self.monitor.step_done(per_rank, flops / self.dist.world_size, data_wait, self.loader.skipped)

    def _log(self, phase: PhaseState) -> None:
        norm = self.engine.get_global_grad_norm()
        self.monitor.log(self.state.step, {
            "lr": self._lr(phase, self.state.step), "mask_ratio": phase.mask_ratio,
            "grad_norm": float(norm) if norm is not None else float("nan"),
            "skipped_steps": float(self.state.nonfinite_skipped), "phase_unmask": float(phase.phase != MASKED),
        }, self.dist.world_size, phase.phase)
