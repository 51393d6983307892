"""Semantic checks of a parsed launch config that need no process group and no data: every
name is looked up in the registry that also builds it, and errors are one line naming the key."""

from __future__ import annotations

from typing import Collection, Dict

from model_zoo.checkpointing import CHECKPOINT_MODES
from model_zoo.registry import MODELS

from ..diffusion import PRECONDITIONINGS, SIGMA_SAMPLERS, WEIGHTINGS
from .deepspeed_json import PRECISIONS
from .phases import MASK_SCHEDULES
from .schema import ConfigError, TrainConfig

CHOICES: Dict[str, Collection[str]] = {
    "model.activation_checkpointing": CHECKPOINT_MODES,
    "diffusion.preconditioning": PRECONDITIONINGS,
    "diffusion.sigma_sampler": SIGMA_SAMPLERS,
    "diffusion.weighting": WEIGHTINGS,
    "phases.schedule": MASK_SCHEDULES,
    "deepspeed.precision": PRECISIONS,
}
"""Keys whose value names a registry entry, with that registry (the config reference lists them
from here; model.name is checked against model_zoo.registry.MODELS on its own: 30 names)."""


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
    for key in ("mask_ratio", "end_mask_ratio"):
        value = getattr(p, key)
        _check(value is None or 0.0 <= value < 1.0, f"phases.{key} must be in [0, 1), got {value}")
    if cfg.model.name in MODELS and not MODELS[cfg.model.name].can_mask:
        _check(p.mask_ratio == 0 and not p.end_mask_ratio,
               f"phases.mask_ratio must be 0 for {cfg.model.name} (only MaskDiT models mask tokens)")
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
    _check(cfg.monitor.max_nonfinite >= 1, "monitor.max_nonfinite must be >= 1")
    _check(cfg.deepspeed.zero_stage in (0, 1, 2, 3),
           f"deepspeed.zero_stage must be 0-3, got {cfg.deepspeed.zero_stage}")
    _check(not cfg.deepspeed.offload_optimizer or cfg.deepspeed.zero_stage >= 1,
           "deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
    _check(cfg.optim.lr > 0 and cfg.optim.warmup_steps >= 0, "optim.lr must be > 0 and optim.warmup_steps >= 0")
