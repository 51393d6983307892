"""What a generated image costs in network FLOPs, counted (on the meta device) rather than timed:
every guided-model evaluation of its sampling run by kind (the whole network or a Skip-Cache reuse
step; the conditional branch and, when guided, the weak branch, whose cost depends on the guidance:
classifier-free guidance runs the whole network again, path-drop guidance skips a SPRINT network's
sparse path)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_zoo.flops import sampling_flops
from model_zoo.registry import build_model


@dataclass(frozen=True)
class StepCosts:
    """FLOPs of one image's forward in each kind of evaluation a sampling run makes."""

    full: float
    """The whole network (conditional branch)."""
    cached: float
    """A Skip-Cache reuse step (conditional branch); 0 without Skip-Cache."""
    weak_full: float
    """Guidance's weak branch on a full step."""
    weak_cached: float
    """Guidance's weak branch on a reuse step."""

    def per_image(self, full_steps: int, cached_steps: int, weak_full_steps: int, weak_cached_steps: int) -> float:
        """FLOPs of one image over a sampling run with these evaluation counts (one batch's)."""
        return (full_steps * self.full + cached_steps * self.cached + weak_full_steps * self.weak_full
                + weak_cached_steps * self.weak_cached)


def step_costs(model_name: str, model_kwargs: dict, guidance: str = "cfg", skip_keep: int | None = None) -> StepCosts:
    """Count the kinds of evaluation of a registry network (built on the meta device: no memory)."""
    kwargs = {k: v for k, v in model_kwargs.items() if k != "class_dropout_prob"}
    with torch.device("meta"):
        net = build_model(model_name, **kwargs)
    full = float(sampling_flops(net))
    cached = float(sampling_flops(net, skip_keep=skip_keep)) if skip_keep is not None else 0.0
    weak = float(sampling_flops(net, path_drop=True)) if guidance == "path_drop" else full
    return StepCosts(full, cached, weak, cached)
