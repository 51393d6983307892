"""The MaskDiT training objective (Zheng et al. 2023) on top of the sigma-form diffusion maths.

Per sample: DSM = the weighted denoising loss averaged over the kept (unmasked) tokens only, plus
lambda_MAE x MAE = the reconstruction of the masked tokens' noisy input patches (normalised per
patch, as MAE's norm_pix_loss), averaged over the masked tokens. With mask ratio 0 every token is
kept and the MAE term is zero, so the objective is plain (weighted) denoising score matching.

Optionally plus lambda_align x ALIGN (representation alignment, REPA, Yu et al. 2024): a head maps
the tokens leaving encoder block k to the teacher's feature space, and ALIGN is the negative
cosine similarity to the teacher's patch features at the same positions, averaged over the kept
tokens (the masked ones never reach the encoder, so they have no state to align).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model_zoo.layers import gather_tokens, patchify  # the network's token order, so masks line up

from .noise import SIGMA_CEIL, SIGMA_FLOOR, SigmaSampler, column
from .preconditioning import Denoiser
from .weighting import LossWeighting


class LossOutput(NamedTuple):
    """Per-sample results [B]: loss = dsm + lambda_mae * mae, and the sigma each sample was noised at."""

    loss: torch.Tensor
    sigma: torch.Tensor
    dsm: torch.Tensor
    mae: torch.Tensor
    align: torch.Tensor | None = None
    """Negative cosine similarity to the teacher per sample (in [-1, 1]); zeros without alignment."""


class Alignment(NamedTuple):
    """What representation alignment needs for one batch.

    head: maps block tokens [B, K, D] to teacher space [B, K, D_teacher] (trained; never exported).
    features: the teacher's patch features [B, N, D_teacher] in the network's token order.
    block: the encoder block (1-based) whose output is aligned.
    weight: lambda_align.
    """

    head: nn.Module
    features: torch.Tensor
    block: int
    weight: float


def alignment_loss(projected: torch.Tensor, features: torch.Tensor,
                   keep_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample negative cosine similarity [B] between projected tokens [B, K, D] and the
    teacher's features [B, N, D], taken at keep_ids [B, K] when the tokens are a kept subset."""
    target = features if keep_ids is None else gather_tokens(features, keep_ids)
    if target.shape != projected.shape:
        raise ValueError(f"teacher features {tuple(target.shape)} do not match the aligned tokens "
                         f"{tuple(projected.shape)} (token grid or feature width differs)")
    return -F.cosine_similarity(projected.float(), target.float(), dim=-1).mean(1)

def per_token_mse(pred: torch.Tensor, target: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Mean squared error per token [B, N] between two [B, C, H, W] tensors (computed in float32)."""
    diff = (pred.float() - target.float()) ** 2
    return patchify(diff, patch_size).mean(-1)


def normalize_patches(tokens: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Standardise each token [B, N, D] over its D values (MAE's per-patch target normalisation)."""
    mean = tokens.mean(-1, keepdim=True)
    var = tokens.var(-1, unbiased=False, keepdim=True)
    return (tokens - mean) / (var + eps).sqrt()


def _masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of values [B, N] over the tokens where weights [B, N] is 1."""
    return (values * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def maskdit_loss(denoiser: Denoiser, x0: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor,
                 noise: torch.Tensor, mask_ratio: float, weighting: LossWeighting,
                 lambda_mae: float = 0.1, align: Alignment | None = None) -> LossOutput:
    """MaskDiT loss for clean latents x0 [B, C, H, W] noised at sigma [B] with noise n ~ N(0, I).

    The DSM part is weighting.output_weight(sigma) * |F - F_target|^2 per token, i.e. the x0-space
    weight converted to the network-output space, averaged over kept tokens. The MAE part compares
    the raw network output F on masked tokens with the normalised noisy input patches; F rather
    than D is used because D = c_skip * x + c_out * F would hand the target (x itself) to the loss.
    With `align`, the alignment term (module doc) is added with weight align.weight.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if lambda_mae < 0:
        raise ValueError(f"lambda_mae must be >= 0, got {lambda_mae}")
    if sigma.shape != (x0.shape[0],):
        raise ValueError(f"sigma must have shape [{x0.shape[0]}], got {tuple(sigma.shape)}")
    p = denoiser.net.patch_size
    precond = denoiser.precond
    # A zero-SNR schedule has sigma = inf: noise at the largest finite sigma instead (SNR ~ 1e-16).
    s = sigma.float().clamp(SIGMA_FLOOR, SIGMA_CEIL)
    x = x0 + column(s, x0).to(x0.dtype) * noise
    out = denoiser.raw(x, s, y, mask_ratio=mask_ratio, hidden_at=align.block if align is not None else 0)
    f, mask = out.sample, out.mask
    # A token-sparse network (SPRINT, TREAD: can_mask without a mask) predicts every token from
    # every token, so its loss covers all of them; any other maskless network cannot mask.
    if mask is None and mask_ratio > 0 and not getattr(denoiser.net, "can_mask", False):
        raise ValueError(f"mask_ratio={mask_ratio} but the network returned no mask (a DiT cannot mask tokens)")
    target = precond.target(x0, noise, s)
    token_loss = per_token_mse(f, target, p) * weighting.output_weight(s, precond)[:, None]
    keep = torch.ones_like(token_loss) if mask is None else 1.0 - mask.float()
    dsm = _masked_mean(token_loss, keep)
    if mask is None or lambda_mae == 0:
        mae = torch.zeros_like(dsm)
    else:
        mae_target = normalize_patches(patchify(x.float(), p))
        mae_token = ((patchify(f.float(), p) - mae_target) ** 2).mean(-1)
        mae = _masked_mean(mae_token, mask.float())
    loss = dsm + lambda_mae * mae
    if align is None:
        return LossOutput(loss, sigma, dsm, mae, torch.zeros_like(dsm))
    aligned = alignment_loss(align.head(out.hidden), align.features, out.keep_ids)
    return LossOutput(loss + align.weight * aligned, sigma, dsm, mae, aligned)


def training_losses(denoiser: Denoiser, x0: torch.Tensor, y: torch.Tensor, mask_ratio: float,
                    weighting: LossWeighting, sigma_sampler: SigmaSampler, lambda_mae: float = 0.1,
                    generator: torch.Generator | None = None, align: Alignment | None = None) -> LossOutput:
    """One training batch: draw sigma [B] and noise, return per-sample losses with their parts.

    The trainer reduces `loss` (e.g. .mean()) for the backward pass and buckets it by `sigma`.
    `generator` draws sigma and noise only: the token mask and the label dropout for classifier-free
    guidance (inside the network in train() mode) come from the global RNG, so seed that too for a
    repeatable batch (the trainer seeds every RNG per micro-step).
    """
    sigma = sigma_sampler(x0.shape[0], device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, generator=generator).to(x0.dtype)
    return maskdit_loss(denoiser, x0, y, sigma, noise, mask_ratio, weighting, lambda_mae, align)
