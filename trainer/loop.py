"""The training loop: build, resume, step through the phase plan, log, checkpoint, always clean up."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

from model_zoo.flops import model_flops
from model_zoo.registry import build_model

from . import checkpoint as ckpt
from .config import TrainConfig, to_deepspeed_json
from .data import build_latent_loader
from .distributed import DistInfo, barrier, build_engine, replica_checksums, seed_step
from .ema import EMA
from .monitor import Monitor, measure_peak_flops
from .phases import PhasePlan
from .preview import decode_latents, make_grid, preview_grid, save_png
from .task import TrainingModule, build_denoiser, build_network, model_kwargs


class RunStopped(RuntimeError):
    """The run stopped on a problem a rerun would meet again (non-finite losses, a checkpoint that
    does not load); the message says why. Exit status 3."""

    exit_code = 3


class StopRequested(RunStopped):
    """The run stopped because it was asked to (a signal or the stop file), after saving a
    checkpoint at a step boundary; rerunning the command resumes. Exit status 5."""

    exit_code = 5


def dataset_summary(manifest) -> dict:
    """What sampling needs to know about the training data: shapes, classes, how to decode."""
    return {"latent_shape": list(manifest.spec.shape), "num_classes": manifest.num_classes,
            "scaling_factor": manifest.scaling_factor, "encoder": manifest.encoder,
            "resolution": manifest.resolution, "class_names": manifest.source.get("class_names")}


@dataclass
class RunState:
    """Counters carried in checkpoints."""

    step: int = 0
    images_seen: int = 0
    nonfinite_skipped: int = 0
    extra: Dict[str, float] = field(default_factory=dict)


class FlopsPerImage:
    """Training FLOPs (forward + backward) per image at a mask ratio, counted once per ratio."""

    def __init__(self, name: str, kwargs: dict):
        self.name, self.kwargs = name, {k: v for k, v in kwargs.items() if k != "class_dropout_prob"}
        self._cache: Dict[float, float] = {}

    def __call__(self, mask_ratio: float) -> float:
        key = round(mask_ratio, 2)
        if key not in self._cache:
            self._cache[key] = float(model_flops(self.name, 1, key, backward=True, **self.kwargs))
        return self._cache[key]


class _StopFlag:
    """Set by SIGTERM, SIGUSR1 or a first SIGINT (preemption, scancel, Ctrl-C) or by the stop file:
    finish the current step, save a checkpoint and exit. A second SIGINT interrupts at once."""

    def __init__(self, stop_file: str):
        self.stop_file = stop_file
        self.reason = ""
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (tests)
                pass

    @property
    def requested(self) -> bool:
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


def _no_beat(what: str) -> None:
    pass


def train(cfg: TrainConfig, dist_info: DistInfo, beat: Callable[[str], None] = _no_beat) -> RunState:
    """Run (or resume) the configured training; returns the final counters.

    `beat(what)` is called at every sign of progress with the work that follows (see
    trainer.watchdog.StallWatchdog).
    """
    rank, world, device = dist_info.rank, dist_info.world_size, dist_info.device
    beat("opening the data shards")
    run_dir = cfg.run.run_dir()
    root = os.path.join(run_dir, "checkpoints")
    d = cfg.data
    loader = build_latent_loader(d.shards, d.micro_batch_size, rank, world, num_workers=d.num_workers,
                                 seed=cfg.run.seed, shuffle_buffer=d.shuffle_buffer, hflip=d.hflip,
                                 epoch_samples=d.epoch_samples, manifest=d.manifest)
    manifest = loader.manifest
    latent_shape = tuple(manifest.spec.shape)
    kwargs = model_kwargs(cfg, latent_shape, manifest.num_classes)
    try:
        resume = ckpt.find_resume(root, cfg.checkpoint.resume)
        resume = resume and ckpt.for_world_size(resume, world)
    except (FileNotFoundError, ckpt.CheckpointError) as err:
        raise RunStopped(str(err)) from None
    ds_config = to_deepspeed_json(cfg, world)
    if resume and ckpt.is_universal(resume):
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    beat("building the engine")
    engine = build_engine(lambda: TrainingModule(build_network(cfg, kwargs), cfg), ds_config, rank, cfg.model.compile)
    net = engine.module.net
    ema = EMA(build_model(cfg.model.name, **kwargs).to(device), cfg.ema, d.batch_size)
    ema.copy_from(net)
    plan = PhasePlan(cfg.phases, cfg.run.total_steps, cfg.optim.warmup_steps)
    flops = FlopsPerImage(cfg.model.name, kwargs)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.precision, torch.float32)
    peak = cfg.monitor.peak_tflops * 1e12 if cfg.monitor.peak_tflops else measure_peak_flops(device, dtype)
    monitor = Monitor(cfg.monitor, run_dir, rank, cfg.run.total_steps, device, peak)
    state = RunState()
    try:
        if resume:
            beat(f"resuming from {resume}")
            state = _resume(cfg, engine, ema, loader, resume, rank, world)
        elif rank == 0:
            monitor.text("config", f"```\n{cfg.to_dict()}\n```")
            monitor.text("phase_plan", f"```\n{plan.table()}\n```")
        _loop(cfg, engine, ema, loader, plan, flops, monitor, state, dist_info, root, kwargs, latent_shape, beat)
        if rank == 0:
            beat("the final sample grid")
            _preview(cfg, ema, manifest, latent_shape, device, monitor, state.step, run_dir)
    finally:
        monitor.close()
    return state


def _resume(cfg, engine, ema, loader, path: str, rank: int, world: int) -> RunState:
    """Load a checkpoint, check that the weights are the saved ones, place the data stream."""
    saved = ckpt.load(engine, ema, path, rank)
    sums = replica_checksums(engine.module.net)  # collective: every rank takes part
    want = (saved.get("replica_checksums") or [None])[0]
    if want and any(abs(a - b) > 1e-6 * max(1.0, abs(b)) for s in sums for a, b in zip(s, want)):
        raise RunStopped(f"weights loaded from {path} differ from the saved ones (checksums {sums} vs {want})")
    data, rescaled = ckpt.resume_data_state(saved, path, rank, world, cfg.data.micro_batch_size, len(loader))
    if rescaled and rank == 0:
        micro = cfg.data.micro_batch_size
        was_micro = ((saved.get("config") or {}).get("data") or {}).get("micro_batch_size", micro)
        was, now = f"a world of {saved['world_size']}", f"{world}"
        if was_micro != micro:
            was, now = f"{was} with micro batches of {was_micro}", f"{now} with micro batches of {micro}"
        print(f"warning: {path} was written by {was}, this run has {now}: the data stream restarts as drawn for "
              f"{world} at epoch {data['epoch']}, batch {data['batches_in_epoch']} (the same share of the epoch; the "
              "rest of this epoch is drawn afresh)", flush=True)
    if data:
        loader.load_state_dict(data)
    if rank == 0:
        checked = " (weights match the saved checksums)" if want else ""
        print(f"resumed from {path} at step {saved['step']}{checked}, optimizer state: "
              f"{ckpt.optimizer_state_summary(engine.optimizer)}", flush=True)
    return RunState(saved["step"], saved["images_seen"], saved["nonfinite_skipped"])


def _loop(cfg, engine, ema, loader, plan, flops, monitor, state, dist_info, root, kwargs, latent_shape, beat) -> None:
    rank, world, device = dist_info.rank, dist_info.world_size, dist_info.device
    accum = cfg.accumulation_steps(world)
    stop = _StopFlag(cfg.run.stop_path())
    batches = loader.batches()
    in_a_row = 0
    stop_after_step = False
    while state.step < cfg.run.total_steps:
        beat(f"step {state.step + 1}")
        if rank == 0:
            stop.poll_file()
        ps = plan.at(state.step)
        for group in engine.optimizer.param_groups:
            group["lr"] = cfg.optim.lr * ps.lr_scale
        micro, attempt, data_wait = 0, 0, 0.0
        while micro < accum:
            start = time.perf_counter()
            z, y = next(batches)
            data_wait += time.perf_counter() - start
            z, y = z.to(device, non_blocking=True), y.to(device, non_blocking=True)
            seed_step(cfg.run.seed, rank, state.step, attempt)
            attempt += 1
            out = engine(z, y, ps.mask_ratio)
            loss = out.loss.mean()
            flags = torch.stack([(~torch.isfinite(loss)).float(), torch.tensor(float(stop.requested), device=device)])
            if world > 1:
                torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            bad, stop_now = flags.tolist()
            # Acted on at the end of the step: the checkpoint then sits on a step boundary and the
            # data position excludes nothing the step drew, so the rerun continues exactly.
            stop_after_step = stop_after_step or bool(stop_now)
            if bad:
                state.nonfinite_skipped += 1
                in_a_row += 1
                if rank == 0:
                    print(f"warning: non-finite loss in step {state.step + 1} (skipped, {in_a_row} in a row)", flush=True)
                if in_a_row >= cfg.monitor.max_nonfinite:
                    raise RunStopped(f"{in_a_row} non-finite losses in a row in step {state.step + 1}: stopping; the last "
                                     f"good checkpoint in {root} is intact (lower optim.lr or check the data)")
                continue
            in_a_row = 0
            engine.backward(loss)
            engine.step()
            monitor.record(out)
            micro += 1
        state.step += 1
        state.images_seen += cfg.data.batch_size
        ema.step_done(state.step, engine.module.net, state.images_seen)
        monitor.step_done(cfg.data.batch_size // world, flops(ps.mask_ratio) * cfg.data.batch_size // world, data_wait,
                          loader.skipped)
        last = state.step == cfg.run.total_steps
        if state.step % cfg.monitor.log_every == 0 or last:
            norm = engine.get_global_grad_norm()
            monitor.log(state.step, {"lr": cfg.optim.lr * ps.lr_scale, "mask_ratio": ps.mask_ratio,
                                     "grad_norm": float(norm) if norm is not None else float("nan"),
                                     "skipped_steps": float(state.nonfinite_skipped),
                                     "phase_unmask": float(ps.phase != "masked")}, world, ps.phase)
        if cfg.monitor.sample_every and state.step % cfg.monitor.sample_every == 0 and not last and rank == 0:
            beat(f"the sample grid at step {state.step}")
            _preview(cfg, ema, loader.manifest, latent_shape, device, monitor, state.step, cfg.run.run_dir())
        if ps.phase_end or state.step % cfg.checkpoint.every == 0 or last or stop_after_step:
            beat(f"saving the checkpoint of step {state.step}")
            _save(cfg, engine, ema, loader, state, root, rank, kwargs, world, ps.phase if ps.phase_end else None)
        if stop_after_step and not last:
            why = f" ({stop.reason})" if stop.reason else ""
            raise StopRequested(f"stop requested{why}: checkpoint saved at step {state.step}; rerun the same "
                                "command to resume")


def _save(cfg, engine, ema, loader, state, root, rank, kwargs, world, phase_end: Optional[str]) -> None:
    tag = ckpt.make_tag(state.step, phase_end)
    sums = replica_checksums(engine.module.net)  # collective: every rank takes part
    if rank == 0 and any(abs(a - b) > 1e-9 * max(1.0, abs(b)) for s in sums for a, b in zip(s, sums[0])):
        print(f"warning: data-parallel replicas hold different weights at step {state.step}: {sums}", flush=True)
    payload = {"replica_checksums": sums, "step": state.step, "images_seen": state.images_seen, "nonfinite_skipped": state.nonfinite_skipped,
               "world_size": world, "model_name": cfg.model.name, "model_kwargs": kwargs,
               "ema_updates": ema.updates, "config": cfg.to_dict(), "phase_end": phase_end,
               "dataset": dataset_summary(loader.manifest)}
    path = ckpt.save(engine, ema, root, tag, payload, loader.state_dict(), rank, barrier)
    if rank == 0:
        ckpt.rotate(root, cfg.checkpoint.keep_last, cfg.checkpoint.keep_phase_ends)
        print(f"saved checkpoint {path}", flush=True)


def _preview(cfg, ema, manifest, latent_shape, device, monitor, step, run_dir) -> str:
    m = cfg.monitor
    denoiser = build_denoiser(ema.module, cfg)
    z = preview_grid(denoiser, m.sample_count, m.sample_steps, m.guidance_scale, latent_shape,
                     manifest.num_classes, device, seed=cfg.run.seed)
    grid = make_grid(decode_latents(z, manifest.scaling_factor, manifest.encoder))
    monitor.image("samples/ema", grid, step)
    return save_png(grid, os.path.join(run_dir, "samples", f"step{step:08d}.png"))
