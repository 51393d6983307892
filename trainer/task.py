"""What is trained: the network from the registry wrapped with its diffusion objective.

DeepSpeed wraps `TrainingModule`, whose forward returns the per-sample losses, so the engine's own
forward path (hooks, ZeRO-3 parameter fetching) is the one used in training.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from model_zoo.registry import build_model

from .config import TrainConfig
from .diffusion import (DDPMSchedule, Denoiser, LossWeighting, ddpm_schedule_for, make_preconditioning,
                        make_sigma_sampler)
from .objective import LossOutput, training_losses


def model_kwargs(cfg: TrainConfig, latent_shape, num_classes: int) -> Dict[str, Any]:
    """Constructor arguments of the network: data-derived sizes, then config options."""
    channels, height, width = latent_shape
    if height != width:
        raise ValueError(f"latents must be square, the dataset's are {height}x{width}")
    kwargs = dict(input_size=height, in_channels=channels, num_classes=num_classes, skip=cfg.model.skip,
                  class_dropout_prob=cfg.model.class_dropout_prob)
    kwargs.update(cfg.model.options)
    return kwargs


def build_network(cfg: TrainConfig, kwargs: Dict[str, Any]) -> nn.Module:
    """Build the registry network with activation checkpointing as configured."""
    net = build_model(cfg.model.name, **kwargs)
    net.set_checkpointing(cfg.model.activation_checkpointing, cfg.model.offload_activations)
    return net


def ddpm_schedule(cfg: TrainConfig) -> Optional[DDPMSchedule]:
    """The DDPM schedule named by diffusion.sigma_sampler (ddpm_linear / ddpm_cosine), else None.

    One schedule serves the training noise levels, the VP preconditioning's timestep input and the
    DDPM sampler grid: a cosine-trained network must not be fed linear-schedule timesteps.
    """
    return ddpm_schedule_for(cfg.diffusion.sigma_sampler)


def build_denoiser(net: nn.Module, cfg: TrainConfig) -> Denoiser:
    """The network with the configured preconditioning."""
    d = cfg.diffusion
    return Denoiser(net, make_preconditioning(d.preconditioning, sigma_data=d.sigma_data,
                                              schedule=ddpm_schedule(cfg)))


class TrainingModule(nn.Module):
    """Denoiser + loss: forward(x0, y, mask_ratio) -> LossOutput with per-sample losses."""

    def __init__(self, net: nn.Module, cfg: TrainConfig):
        super().__init__()
        d = cfg.diffusion
        self.denoiser = build_denoiser(net, cfg)
        self.weighting = LossWeighting(d.weighting, gamma=d.gamma, sigma_data=d.sigma_data)
        self.sigma_sampler = make_sigma_sampler(d.sigma_sampler, p_mean=d.p_mean, p_std=d.p_std,
                                                schedule=getattr(self.denoiser.precond, "schedule", None))
        self.lambda_mae = d.lambda_mae

    @property
    def net(self) -> nn.Module:
        """The registry network being trained."""
        return self.denoiser.net

    def forward(self, x0: torch.Tensor, y: torch.Tensor, mask_ratio: float = 0.0,
                generator: Optional[torch.Generator] = None) -> LossOutput:
        """Per-sample weighted losses of one micro-batch (noise, sigma and mask drawn inside)."""
        return training_losses(self.denoiser, x0, y, mask_ratio, self.weighting, self.sigma_sampler,
                               lambda_mae=self.lambda_mae, generator=generator)
