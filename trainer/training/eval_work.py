"""The work of an in-loop evaluation, dealt to the ranks so that the result does not depend on how
many there are: items are cut into batches of a fixed size, rank r works batches r, r + W, ...,
and every rank puts the per-batch results together in batch order. The same batch is the same
computation on any number of ranks, so 1 and 2 ranks give the same numbers.

Three kinds of work: generated images judged by a feature network (digits classifier, Inception),
the validation loss on held-out samples at fixed noise levels, and the FID reference statistics of
training samples.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..diffusion import Denoiser, SkipCacheConfig, default_sigmas, sample
from ..sample.generate import SampleSettings, image_noise, step_generator
from ..sample.preview import decode_latents

T = TypeVar("T")


def batches_of(count: int, batch_size: int, rank: int, world_size: int) -> List[Tuple[int, range]]:
    """(batch index, item indices) of the batches this rank works."""
    starts = range(0, count, batch_size)
    return [(b, range(start, min(start + batch_size, count))) for b, start in enumerate(starts)
            if b % world_size == rank]


def in_batch_order(mine: Dict[int, T]) -> List[T]:
    """Every rank's per-batch results, in batch order, on every rank (one all_gather_object)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: List[Dict[int, T] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        merged = {k: v for part in parts for k, v in (part or {}).items()}
    else:
        merged = dict(mine)
    return [merged[k] for k in sorted(merged)]


def generate_features(denoiser: Denoiser, settings: SampleSettings, *, count: int, latent_shape: Sequence[int],
                      num_classes: int, to_images: Callable[[torch.Tensor], torch.Tensor],
                      featurizers: Dict[str, Callable[[np.ndarray], np.ndarray]], rank: int, world_size: int,
                      device: torch.device) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """({name: features [count, ...]}, labels [count]) of `count` generated images, sampled as
    `settings` say (in batches of settings.batch_size): image i has label i % num_classes and the
    starting noise (and step noise) of (settings.seed, i), as `mdt-sample` makes it; `to_images`
    decodes latents to [B, 3, H, W] in [0, 1], each featurizer maps uint8 images [B, H, W, 3] to an
    array with one row per image."""
    schedule = getattr(denoiser.precond, "schedule", None)
    sigmas = default_sigmas(settings.sampler, settings.resolved_steps(), schedule, denoiser.precond.name).to(device)
    skip = None
    if settings.skip_cache_interval:
        skip = SkipCacheConfig(settings.skip_cache_interval, settings.skip_cache_keep, settings.skip_cache_full_sigma)
    seed = settings.seed
    mine = {}
    for b, idx in batches_of(count, settings.batch_size, rank, world_size):
        noise = torch.stack([image_noise(seed, i, latent_shape) for i in idx]).to(device)
        labels = torch.tensor([i % num_classes for i in idx], device=device)
        gens = [step_generator(seed, i, device) for i in idx]
        z = sample(denoiser, noise, labels, sigmas, sampler=settings.sampler, guidance_scale=settings.guidance_scale,
                   guidance_interval=settings.guidance_interval, skip_cache=skip, generator=gens,
                   guidance_channels=settings.guidance_channels, guidance=settings.guidance).x
        with torch.no_grad():
            images = (to_images(z).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        mine[b] = ({name: f(images) for name, f in featurizers.items()}, labels.cpu().numpy())
    parts = in_batch_order(mine)
    features = {name: np.concatenate([f[name] for f, _ in parts]) for name in featurizers}
    return features, np.concatenate([y for _, y in parts])


def latent_decoder(scaling_factor: float, encoder: dict,
                   vae: nn.Module | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Latents as trained -> images [B, 3, H, W] in [0, 1] (pixels, or through the dataset's VAE)."""
    return lambda z: decode_latents(z, scaling_factor, encoder, vae)


def sample_noise(seed: int, index: int, level: int, shape: Sequence[int]) -> torch.Tensor:
    """The fixed noise of validation sample `index` at noise level `level`."""
    return image_noise(seed, index * 1009 + level + 1, shape)  # 1009 > levels: distinct per pair


@torch.no_grad()
def validation_loss(denoiser: Denoiser, x0: torch.Tensor, y: torch.Tensor, *, sigmas: Sequence[float],
                    batch_size: int, seed: int, rank: int, world_size: int, device: torch.device) -> np.ndarray:
    """Mean squared denoising error in x0 space, E|D(x0 + sigma n; sigma, y) - x0|^2, per noise level
    [len(sigmas)], over the validation samples x0 [N, C, H, W] (labels y [N]), with the fixed noise of
    (seed, sample, level) and no masking: the same weights always give the same numbers."""
    mine = {}
    for b, idx in batches_of(len(x0), batch_size, rank, world_size):
        xb, yb = x0[list(idx)].to(device), y[list(idx)].to(device)
        sums = np.zeros(len(sigmas), dtype=np.float64)
        for level, sigma in enumerate(sigmas):
            noise = torch.stack([sample_noise(seed, i, level, xb.shape[1:]) for i in idx]).to(device)
            denoised = denoiser(xb + sigma * noise, torch.full((len(idx),), float(sigma), device=device), yb)
            sums[level] = float((denoised.float() - xb.float()).square().flatten(1).mean(1).double().sum())
        mine[b] = sums
    return np.sum(in_batch_order(mine), axis=0) / len(x0)


def reference_features(latents: torch.Tensor, *, batch_size: int, to_images: Callable[[torch.Tensor], torch.Tensor],
                       featurize: Callable[[np.ndarray], np.ndarray], rank: int, world_size: int,
                       device: torch.device) -> np.ndarray:
    """Features [N, D] of real samples given as latents [N, C, H, W] (decoded like generated ones)."""
    mine = {}
    for b, idx in batches_of(len(latents), batch_size, rank, world_size):
        with torch.no_grad():
            images = to_images(latents[list(idx)].to(device))
        mine[b] = featurize((images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(in_batch_order(mine))
