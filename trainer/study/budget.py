"""A study's budget in training steps: an images budget is images // data.batch_size; a FLOPs budget
is the fewest steps whose training FLOPs (the phase plan laid over them, each step's mask ratio
counted by the run's own counter, trainer.config.TrainingFlops) reach it. The network's sizes come
from the dataset's manifest."""

from __future__ import annotations

from typing import Callable

from data_tools.format import DataToolsError
from data_tools.manifest import Manifest, manifest_location

from ..config import ConfigError, PhasePlan, TrainConfig, TrainingFlops
from ..config.phases import MASKED


def steps_for_images(cfg: TrainConfig, images: int) -> int:
    """Whole steps of data.batch_size images within the budget."""
    steps = images // cfg.data.batch_size
    if steps <= 0:
        raise ConfigError(f"budget.images {images} is less than one batch (data.batch_size {cfg.data.batch_size})")
    return steps


def dataset_manifest(cfg: TrainConfig) -> Manifest:
    """The manifest of the configured training data (data.manifest, or where data.shards has it)."""
    if not cfg.data.shards and not cfg.data.manifest:
        raise ConfigError("data.shards is empty: point it at a directory made by `mdt-data encode`")
    try:
        return Manifest.load(manifest_location(cfg.data.shards, cfg.data.manifest))
    except DataToolsError as err:
        raise ConfigError(f"data.shards: {err}") from None


def flops_per_image(cfg: TrainConfig, manifest: Manifest) -> TrainingFlops:
    """The counter the trainer uses for its train_flops, for this config's network (and alignment
    head) on the manifest's data."""
    features = manifest.feature_spec if cfg.align.enabled else None
    try:
        return TrainingFlops(cfg, manifest.spec.shape, manifest.num_classes,
                             features.shape[0] if features is not None else None)
    except ValueError as err:  # alignment on data without teacher features
        raise ConfigError(str(err)) from None


def training_flops(cfg: TrainConfig, total_steps: int, per_image: Callable[[float], float]) -> float:
    """Training FLOPs of a run of total_steps steps (the phase plan laid over them), all ranks."""
    plan = PhasePlan(cfg.phases, total_steps, cfg.optim.warmup_steps)
    total = 0.0
    for first, last, phase, ratio, _, _ in plan.segments():
        if phase == MASKED and cfg.phases.end_mask_ratio is not None:  # a schedule: the ratio moves every step
            total += sum(per_image(plan.at(s).mask_ratio) for s in range(first, last + 1))
        else:
            total += (last - first + 1) * per_image(ratio)
    return total * cfg.data.batch_size


def steps_for_flops(cfg: TrainConfig, budget: float, per_image: Callable[[float], float]) -> int:
    """The fewest steps whose training FLOPs reach the budget (the plan is laid over the steps)."""
    hi = 1
    while training_flops(cfg, hi, per_image) < budget:
        hi *= 2
    lo = hi // 2 + 1 if hi > 1 else 1
    while lo < hi:  # FLOPs grow with the steps: bisect
        mid = (lo + hi) // 2
        if training_flops(cfg, mid, per_image) >= budget:
            hi = mid
        else:
            lo = mid + 1
    # A mask schedule stretched over more steps can cost a hair less in total: step back while it still reaches.
    while hi > 1 and training_flops(cfg, hi - 1, per_image) >= budget:
        hi -= 1
    return hi
