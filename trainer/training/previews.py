"""Sample grids during training: from the EMA weights with guidance, every monitor.sample_every
steps and at the end, to TensorBoard and RUN_DIR/samples/ (rank 0). Latents of VAE data are
decoded through the dataset's VAE, so a grid shows images, not latent channels."""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from data_tools.manifest import Manifest
from data_tools.vae import load_autoencoder

from ..config import TrainConfig
from ..console import warn
from ..sample.preview import decode_latents, make_grid, preview_grid, save_png
from .ema import EMA
from .monitor import Monitor
from .run_control import StepEnd


class SampleGrids:
    """Makes the run's sample grids; `due` says when."""

    def __init__(self, cfg: TrainConfig, ema: EMA, manifest: Manifest, latent_shape: Sequence[int],
                 device: torch.device, monitor: Monitor):
        self.cfg, self.ema, self.manifest, self.latent_shape = cfg, ema, manifest, tuple(latent_shape)
        self.device, self.monitor = device, monitor
        self._vae: nn.Module | None = None
        self._vae_tried = False

    def due(self, end: StepEnd) -> bool:
        """Whether a grid follows the step just finished: every monitor.sample_every steps before the
        last (the final grid comes after the loop)."""
        every = self.cfg.monitor.sample_every
        return bool(every) and end.step % every == 0 and not end.last

    def make(self, step: int) -> str:
        """Sample a grid from the EMA weights, log it and write it as PNG; returns the path."""
        m = self.cfg.monitor
        z = preview_grid(self.cfg.diffusion.denoiser(self.ema.module), m.sample_count, m.sample_steps,
                         m.guidance_scale, self.latent_shape, self.manifest.num_classes, self.device,
                         seed=self.cfg.run.seed)
        grid = make_grid(decode_latents(z, self.manifest.scaling_factor, self.manifest.encoder, self._decoder()))
        self.monitor.image("samples/ema", grid, step)
        return save_png(grid, os.path.join(self.cfg.run.run_dir(), "samples", f"step{step:08d}.png"))

    def _decoder(self) -> nn.Module | None:
        """The dataset's VAE (loaded on first use, on the rank that draws grids); None for pixel data,
        or with a warning when it cannot be loaded (the grid then shows latent channels)."""
        encoder = self.manifest.encoder or {}
        if encoder.get("kind") != "vae" or self._vae_tried:
            return self._vae
        self._vae_tried = True
        try:
            vae = load_autoencoder(encoder.get("id", ""), torch.float32)
            self._vae = vae.eval().requires_grad_(False).to(self.device)
        except Exception as err:  # noqa: BLE001 - a grid is worth a warning, not the run
            warn(f"sample grids show latent channels: the dataset's VAE {encoder.get('id')!r} does not load "
                 f"({' '.join(str(err).split())[:200]})")
        return self._vae
