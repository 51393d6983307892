"""Exponential moving average of the network weights, correct under every ZeRO stage.

The average lives in a separate float32 copy of the network (built outside zero.Init, so it is
never partitioned). Under ZeRO-3 the live parameters are gathered one top-level child at a time
for the update, which bounds the extra memory to the largest child.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from ..config import EMAConfig
from .engine import gathered, parameter_chunks


class EMA:
    """Float32 EMA of a network; `update` after optimizer steps, `module` for sampling."""

    def __init__(self, shadow: nn.Module, cfg: EMAConfig, images_per_step: int):
        self.module = shadow.float().eval().requires_grad_(False)
        self.cfg = cfg
        self.images_per_step = images_per_step
        self.updates = 0

    def decay(self, images_seen: int) -> float:
        """Decay for the next update, with the configured warm-up."""
        c = self.cfg
        if c.half_life_images is not None:
            half_life = c.half_life_images
            if c.warmup:
                # EDM's ramp: the half-life never exceeds 5% of the images seen so far.
                half_life = min(half_life, max(images_seen, self.images_per_step) * 0.05)
            return 0.5 ** (self.images_per_step * c.update_every / max(half_life, 1e-8))
        if c.warmup:
            return min(c.decay, (1 + self.updates) / (10 + self.updates))
        return c.decay

    @torch.no_grad()
    def copy_from(self, live: nn.Module) -> None:
        """Set the average to the live weights (start of training)."""
        self._blend(live, 0.0)

    def due(self, step: int) -> bool:
        """Whether the update after optimizer step `step` (1-based) is one of every `update_every`."""
        return step % self.cfg.update_every == 0

    def step_done(self, step: int, live: nn.Module, images_seen: int) -> bool:
        """Called after every optimizer step: update when due; returns whether it did."""
        if not self.due(step):
            return False
        self.update(live, images_seen)
        return True

    @torch.no_grad()
    def update(self, live: nn.Module, images_seen: int) -> None:
        """Blend the live weights in: ema = d * ema + (1 - d) * live."""
        self._blend(live, self.decay(images_seen))
        self.updates += 1

    def _blend(self, live: nn.Module, decay: float) -> None:
        shadow = dict(self.module.named_parameters())
        for params in parameter_chunks(live):
            with gathered([p for _, p in params]):
                for name, p in params:
                    target = shadow[name]
                    if decay == 0.0:
                        target.copy_(p.detach().float())
                    else:
                        target.lerp_(p.detach().to(target.device, torch.float32), 1.0 - decay)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The averaged weights (float32, parameter names of the network)."""
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: Dict[str, torch.Tensor], updates: int) -> None:
        """Restore the average and its update count (which drives the warm-up)."""
        self.module.load_state_dict(state)
        self.updates = updates
