"""Semantic checks of a parsed launch config that need no process group and no data: every
name is looked up in the registry that also builds it, and errors are one line naming the key."""

from __future__ import annotations

from typing import Collection, Dict

import torch

from model_zoo.checkpointing import CHECKPOINT_MODES
from model_zoo.registry import MODELS

from ..diffusion import GUIDANCE_KINDS, PRECONDITIONINGS, SAMPLERS, SIGMA_SAMPLERS, WEIGHTINGS
from ..diffusion.noise import ZERO_SNR_SUFFIX
from ..evaluation.registry import EVAL_GROUPS, METRIC_SPECS
from .deepspeed_json import PRECISIONS
from .phases import LR_SCHEDULES, MASK_SCHEDULES
from .schema import NONFINITE_ACTIONS, ConfigError, TrainConfig

CHOICES: Dict[str, Collection[str]] = {
    "model.activation_checkpointing": CHECKPOINT_MODES,
    "diffusion.preconditioning": PRECONDITIONINGS,
    "diffusion.sigma_sampler": SIGMA_SAMPLERS,
    "diffusion.weighting": WEIGHTINGS,
    "phases.schedule": MASK_SCHEDULES,
    "optim.lr_schedule": LR_SCHEDULES,
    "deepspeed.precision": PRECISIONS,
    "eval.sampler": SAMPLERS,
    "eval.guidance": GUIDANCE_KINDS,
    "monitor.on_nonfinite": NONFINITE_ACTIONS,
}
"""Keys whose value names a registry entry, with that registry (the config reference lists them
from here; model.name is checked against model_zoo.registry.MODELS on its own)."""


EVAL_METRICS = EVAL_GROUPS
"""eval.metrics: what the run's evaluator (trainer.training.evaluator) measures, by the metric
registry's groups (trainer.evaluation.registry: read here without importing the runtime)."""
IMAGE_GROUPS = {spec.group for spec in METRIC_SPECS.values() if spec.function is not None}
"""The eval.metrics entries judged on generated images (Frechet distances need 2 of them)."""


def _choices(names: Collection[str]) -> str:
    return ", ".join(names)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: TrainConfig, world_size: int) -> None:
    """Semantic checks that need no process group; raises ConfigError naming the key. Whether the
    data exist is checked where the data are read (trainer.training.data.check_shards)."""
    d, p = cfg.data, cfg.phases
    _check(cfg.model.name in MODELS, f"model.name: unknown model {cfg.model.name!r}; choose from {', '.join(MODELS)}")
    _check(not cfg.model.init_strict or bool(cfg.model.init_from), "model.init_strict needs model.init_from")
    _validate_model(cfg)
    for key, names in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _check(value in names, f"{key}: {value!r} is not one of {_choices(names)}")
    _check(cfg.run.total_steps > 0, "run.total_steps must be > 0")
    _check(cfg.run.stall_timeout_s >= 0,
           f"run.stall_timeout_s must be >= 0 (0 disables), got {cfg.run.stall_timeout_s}")
    _check(d.micro_batch_size > 0 and d.batch_size > 0, "data.batch_size and data.micro_batch_size must be > 0")
    _check(d.batch_size % (d.micro_batch_size * world_size) == 0,
           f"data.batch_size {d.batch_size} is not divisible by data.micro_batch_size {d.micro_batch_size} "
           f"x {world_size} ranks")
    _check(cfg.diffusion.gamma > 0, f"diffusion.gamma must be > 0, got {cfg.diffusion.gamma}")
    a = cfg.align
    _check(a.lambda_align >= 0, f"align.lambda_align must be >= 0 (0: off), got {a.lambda_align}")
    _check(a.block >= 0, f"align.block must be >= 1 (0: a third of the depth), got {a.block}")
    _check(a.head_hidden >= 1, f"align.head_hidden must be >= 1, got {a.head_hidden}")
    if a.enabled and cfg.model.name in MODELS:
        depth = {**MODELS[cfg.model.name].defaults, **cfg.model.options}.get("depth", 0)
        _check(a.block_for(depth) <= depth,
               f"align.block {a.block} is deeper than {cfg.model.name}'s {depth} encoder blocks")
    for key in ("mask_ratio", "end_mask_ratio"):
        value = getattr(p, key)
        _check(value is None or 0.0 <= value < 1.0, f"phases.{key} must be in [0, 1), got {value}")
    if cfg.model.name in MODELS and not MODELS[cfg.model.name].can_mask:
        _check(p.mask_ratio == 0 and not p.end_mask_ratio,
               f"phases.mask_ratio must be 0 for {cfg.model.name} (only MaskDiT, SPRINT and TREAD models drop "
               "tokens)")
    _check(p.schedule_levels >= 0, f"phases.schedule_levels must be >= 0 (0: continuous), got {p.schedule_levels}")
    _check(not (cfg.model.compile and p.end_mask_ratio is not None and p.schedule_levels == 0),
           "phases.schedule_levels: 0 gives a compiled model a new token count, so a new graph, at nearly every "
           "step of the schedule: use a few levels (e.g. 8) with model.compile")
    _check(p.unmask_every >= 0 and p.unmask_steps >= 0 and p.final_unmask_steps >= 0,
           "phases.unmask_every, unmask_steps and final_unmask_steps must be >= 0")
    _check(p.unmask_every == 0 or p.unmask_steps < p.unmask_every,
           f"phases.unmask_steps {p.unmask_steps} must be < phases.unmask_every {p.unmask_every}")
    _check(p.final_unmask_steps < cfg.run.total_steps,
           f"phases.final_unmask_steps {p.final_unmask_steps} must be < run.total_steps {cfg.run.total_steps}")
    _check(0.0 < cfg.ema.decay < 1.0, f"ema.decay must be in (0, 1), got {cfg.ema.decay}")
    _check(cfg.ema.half_life_images is None or cfg.ema.half_life_images > 0, "ema.half_life_images must be > 0")
    _check(cfg.ema.update_every >= 1, "ema.update_every must be >= 1")
    _check(cfg.checkpoint.every > 0 and cfg.checkpoint.keep_last >= 1,
           "checkpoint.every must be > 0 and checkpoint.keep_last >= 1")
    _check(cfg.monitor.log_every > 0, "monitor.log_every must be > 0")
    _validate_recovery(cfg)
    _check(cfg.deepspeed.zero_stage in (0, 1, 2, 3),
           f"deepspeed.zero_stage must be 0-3, got {cfg.deepspeed.zero_stage}")
    _check(not cfg.deepspeed.offload_optimizer or cfg.deepspeed.zero_stage >= 1,
           "deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
    _check(cfg.optim.lr > 0 and cfg.optim.warmup_steps >= 0, "optim.lr must be > 0 and optim.warmup_steps >= 0")
    _check(cfg.optim.lr_schedule == "constant" or cfg.optim.warmup_steps < cfg.run.total_steps - 1,
           f"optim.lr_schedule: {cfg.optim.lr_schedule} decays after the warm-up, but optim.warmup_steps "
           f"{cfg.optim.warmup_steps} leaves no step of run.total_steps {cfg.run.total_steps} to decay over")
    _check(0.0 <= cfg.optim.min_lr <= cfg.optim.lr,
           f"optim.min_lr must be in [0, optim.lr {cfg.optim.lr:g}], got {cfg.optim.min_lr:g}")
    _check(not (cfg.diffusion.sigma_sampler.endswith(ZERO_SNR_SUFFIX) and cfg.diffusion.preconditioning == "vp_eps"),
           f"diffusion.sigma_sampler: {cfg.diffusion.sigma_sampler} (zero terminal SNR) cannot train vp_eps: "
           "epsilon-prediction cannot recover the image where SNR = 0; use vp_v")
    _check(cfg.run.time_limit_s is None or cfg.run.time_limit_s > 0,
           f"run.time_limit_s must be > 0 (null: no limit), got {cfg.run.time_limit_s}")
    _check(0.0 <= d.val_fraction < 1.0, f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    _validate_eval(cfg)


def _validate_model(cfg: TrainConfig) -> None:
    """model.options build the network (on the meta device: no memory), and the model's family
    allows the rest of the config."""
    m = cfg.model
    if m.name not in MODELS:
        return
    spec = MODELS[m.name]
    _check(not (m.skip and spec.family in ("sprint", "tread")),
           f"model.skip: Skip-DiT long skips cannot cross the sparse blocks of {m.name} (a {spec.family} model); set "
           "model.skip: false")
    try:
        with torch.device("meta"):
            spec.build(**{**m.options, "skip": m.skip})
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model.options: {' '.join(str(err).split())}") from None
    _check(cfg.eval.guidance != "path_drop" or spec.family == "sprint",
           f"eval.guidance: path_drop needs a SPRINT model (a sparse path to drop); {m.name} is a {spec.family} model")


def _validate_recovery(cfg: TrainConfig) -> None:
    m = cfg.monitor
    _check(m.max_nonfinite >= 1, "monitor.max_nonfinite must be >= 1")
    _check(m.max_rollbacks >= 0, f"monitor.max_rollbacks must be >= 0, got {m.max_rollbacks}")
    _check(0.0 < m.rollback_lr_scale <= 1.0, f"monitor.rollback_lr_scale must be in (0, 1], got {m.rollback_lr_scale}")
    _check(m.rollback_lr_steps >= 0, f"monitor.rollback_lr_steps must be >= 0, got {m.rollback_lr_steps}")
    _check(m.spike_factor == 0 or m.spike_factor > 1,
           f"monitor.spike_factor must be 0 (off) or > 1, got {m.spike_factor}")
    _check(m.spike_steps >= 1, f"monitor.spike_steps must be >= 1, got {m.spike_steps}")


def _validate_eval(cfg: TrainConfig) -> None:
    e = cfg.eval
    _check(e.every >= 0, f"eval.every must be >= 0 (0: no evaluation), got {e.every}")
    unknown = [m for m in e.metrics if m not in EVAL_METRICS]
    _check(not unknown, f"eval.metrics: {unknown[0]!r} is not one of {_choices(EVAL_METRICS)}" if unknown else "")
    _check(len(set(e.metrics)) == len(e.metrics), f"eval.metrics lists a metric twice: {e.metrics}")
    _check(bool(e.guidance_scales) and all(g == g and abs(g) != float("inf") for g in e.guidance_scales),
           f"eval.guidance_scales must be a non-empty list of finite numbers, got {e.guidance_scales}")
    for key in ("num_images", "batch_size", "steps", "val_samples"):
        value = getattr(e, key)
        _check(value >= 1, f"eval.{key} must be >= 1, got {value}")
    _check(e.num_images >= 2 or not (IMAGE_GROUPS & set(e.metrics)),
           f"eval.num_images must be >= 2 for Frechet distances, got {e.num_images}")
    _check(e.skip_cache is None or (e.skip_cache >= 1 and cfg.model.skip),
           "eval.skip_cache needs model.skip: true and an interval >= 1")
    _check(bool(e.val_sigmas) and all(s > 0 for s in e.val_sigmas),
           f"eval.val_sigmas must be a non-empty list of noise levels > 0, got {e.val_sigmas}")
    if e.every and "val_loss" in e.metrics:
        _check(bool(cfg.data.val_shards) or cfg.data.val_fraction > 0,
               "eval.metrics has val_loss: set data.val_shards (held-out data) or data.val_fraction (a share of "
               "the shards held out from training)")
