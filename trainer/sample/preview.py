"""Latents to pictures: decoding (pixels or a VAE), grids, PNG files, and the small guided sample
the training run shows as its sample grid."""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch
from PIL import Image
from torch import nn

from ..diffusion import Denoiser, default_sigmas, sample


def decode_latents(z: torch.Tensor, scaling_factor: float, encoder: dict,
                   vae: nn.Module | None = None) -> torch.Tensor:
    """Latents (as trained, i.e. scaled) -> images in [0, 1], [B, 3, H, W].

    pixels: the latent is the image in [-1, 1]. vae: decoded when a VAE module is given; without
    one, the first three latent channels are shown (normalised) so a grid is still informative.
    """
    x = z.float() / scaling_factor
    if encoder.get("kind") == "pixels":
        images = x
    elif vae is not None:
        images = vae.decode(x.to(next(vae.parameters()).dtype)).sample.float()
    else:
        images = x[:, :3]
        images = images / images.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return ((images + 1) / 2).clamp(0, 1)


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> one [3, rows*(H+pad)+pad, cols*(W+pad)+pad] image."""
    b, c, h, w = images.shape
    cols = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i in range(b):
        r, k = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        grid[:, top:top + h, left:left + w] = images[i].cpu()
    return grid


def save_png(grid: torch.Tensor, path: str) -> str:
    """Write a [3, H, W] grid in [0, 1] as PNG."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    array = (grid.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    Image.fromarray(array).save(path)
    return path


@torch.no_grad()
def preview_grid(denoiser: Denoiser, count: int, steps: int, guidance_scale: float, latent_shape: Sequence[int],
                 num_classes: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """EDM Heun samples (on the flow grid for a flow-matching model) with guidance for classes 0, 1,
    2, ... (cycling); fixed noise per seed."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(count, *latent_shape, generator=gen).to(device)
    y = (torch.arange(count) % num_classes).to(device)
    sigmas = default_sigmas("heun", steps, preconditioning=denoiser.precond.name).to(device)
    return sample(denoiser, noise, y, sigmas, sampler="heun", guidance_scale=guidance_scale).x
