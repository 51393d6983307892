"""What is trained: the network from the registry wrapped with its diffusion objective.

DeepSpeed wraps `TrainingModule`, whose forward returns the per-sample losses, so the engine's own
forward path (hooks, ZeRO-3 parameter fetching) is the one used in training. The representation
alignment head lives here, beside the network rather than in it: checkpoints carry it (so a resume
continues it), while the EMA, exports and sampling see the network alone.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from model_zoo.registry import build_model

from ..config import TrainConfig
from ..config.flops import align_head_flops_per_token
from ..diffusion import Alignment, LossOutput, LossWeighting, make_sigma_sampler, training_losses


def build_network(cfg: TrainConfig, kwargs: Dict[str, Any]) -> nn.Module:
    """Build the registry network with activation checkpointing as configured."""
    net = build_model(cfg.model.name, **kwargs)
    net.set_checkpointing(cfg.model.activation_checkpointing, cfg.model.offload_activations)
    return net


class AlignHead(nn.Module):
    """REPA's projector: Linear, SiLU, Linear, SiLU, Linear from the network's width to the
    teacher's, applied per token."""

    def __init__(self, width: int, hidden: int, out: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, out))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, K, width] -> [B, K, out]."""
        return self.mlp(tokens)

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), by the run's one count."""
        first, middle, last = (layer for layer in self.mlp if isinstance(layer, nn.Linear))
        return align_head_flops_per_token(first.in_features, middle.in_features, last.out_features)


def tokens_from_grid(features: torch.Tensor, grid: int) -> torch.Tensor:
    """Teacher features [B, D, G, G] (any float dtype) -> [B, grid^2, D] float32 in the network's
    token order (row-major, as patchify). A finer stored grid is averaged down (area), a coarser
    one interpolated bilinearly."""
    f = features.float()
    if f.shape[-1] != grid:
        mode = "area" if f.shape[-1] > grid else "bilinear"
        f = F.interpolate(f, size=(grid, grid), mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))
    return f.flatten(2).transpose(1, 2)


class TrainingModule(nn.Module):
    """Denoiser + loss: forward(x0, y, mask_ratio[, features]) -> LossOutput with per-sample losses.

    Sigma, noise, the token mask and the label dropout all come from the global RNG, which the
    trainer seeds per micro-step (trainer.training.engine.seed_step). With align.lambda_align > 0,
    feature_shape = (teacher width, stored grid side) builds the alignment head and forward takes
    the batch's teacher features [B, D, G, G].
    """

    def __init__(self, net: nn.Module, cfg: TrainConfig, feature_shape: Tuple[int, int] | None = None):
        super().__init__()
        d = cfg.diffusion
        self.denoiser = d.denoiser(net)
        self.weighting = LossWeighting(d.weighting, gamma=d.gamma, sigma_data=d.sigma_data)
        self.sigma_sampler = make_sigma_sampler(d.sigma_sampler, p_mean=d.p_mean, p_std=d.p_std,
                                                schedule=getattr(self.denoiser.precond, "schedule", None))
        self.lambda_mae = d.lambda_mae
        self.align_head: AlignHead | None = None
        self.lambda_align, self.align_block = cfg.align.lambda_align, 0
        if cfg.align.enabled:
            if feature_shape is None:
                raise ValueError("align.lambda_align > 0 needs the teacher features' shape (width, grid)")
            self.align_block = cfg.align.block_for(net.depth)
            if not 1 <= self.align_block <= net.depth:
                raise ValueError(f"align.block {self.align_block} is outside the network's 1..{net.depth} blocks")
            self.align_head = AlignHead(net.hidden_size, cfg.align.head_hidden, feature_shape[0])

    @property
    def net(self) -> nn.Module:
        """The registry network being trained."""
        return self.denoiser.net

    def forward(self, x0: torch.Tensor, y: torch.Tensor, mask_ratio: float = 0.0,
                features: torch.Tensor | None = None) -> LossOutput:
        """Per-sample weighted losses of one micro-batch (noise, sigma and mask drawn inside)."""
        align = None
        if self.align_head is not None:
            if features is None:
                raise ValueError("this module aligns representations: pass the batch's teacher features")
            align = Alignment(self.align_head, tokens_from_grid(features, self.net.grid_size), self.align_block,
                              self.lambda_align)
        return training_losses(self.denoiser, x0, y, mask_ratio, self.weighting, self.sigma_sampler,
                               lambda_mae=self.lambda_mae, align=align)
