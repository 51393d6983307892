"""What is trained: the network from the registry wrapped with its diffusion objective.

DeepSpeed wraps `TrainingModule`, whose forward returns the per-sample losses, so the engine's own
forward path (hooks, ZeRO-3 parameter fetching) is the one used in training.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from model_zoo.registry import build_model

from ..config import TrainConfig
from ..diffusion import LossOutput, LossWeighting, make_sigma_sampler, training_losses


def build_network(cfg: TrainConfig, kwargs: Dict[str, Any]) -> nn.Module:
    """Build the registry network with activation checkpointing as configured."""
    net = build_model(cfg.model.name, **kwargs)
    net.set_checkpointing(cfg.model.activation_checkpointing, cfg.model.offload_activations)
    return net


class TrainingModule(nn.Module):
    """Denoiser + loss: forward(x0, y, mask_ratio) -> LossOutput with per-sample losses.

    Sigma, noise, the token mask and the label dropout all come from the global RNG, which the
    trainer seeds per micro-step (trainer.training.engine.seed_step)."""

    def __init__(self, net: nn.Module, cfg: TrainConfig):
        super().__init__()
        d = cfg.diffusion
        self.denoiser = d.denoiser(net)
        self.weighting = LossWeighting(d.weighting, gamma=d.gamma, sigma_data=d.sigma_data)
        self.sigma_sampler = make_sigma_sampler(d.sigma_sampler, p_mean=d.p_mean, p_std=d.p_std,
                                                schedule=getattr(self.denoiser.precond, "schedule", None))
        self.lambda_mae = d.lambda_mae

    @property
    def net(self) -> nn.Module:
        """The registry network being trained."""
        return self.denoiser.net

    def forward(self, x0: torch.Tensor, y: torch.Tensor, mask_ratio: float = 0.0) -> LossOutput:
        """Per-sample weighted losses of one micro-batch (noise, sigma and mask drawn inside)."""
        return training_losses(self.denoiser, x0, y, mask_ratio, self.weighting, self.sigma_sampler,
                               lambda_mae=self.lambda_mae)
