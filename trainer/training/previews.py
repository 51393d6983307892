"""Sample grids during training: from the EMA weights with guidance, every monitor.sample_every
steps and at the end, to TensorBoard and RUN_DIR/samples/ (rank 0)."""

from __future__ import annotations

import os
from typing import Sequence

import torch

from data_tools.format import Manifest

from ..config import TrainConfig
from ..sample.preview import decode_latents, make_grid, preview_grid, save_png
from .ema import EMA
from .monitor import Monitor


class SampleGrids:
    """Makes the run's sample grids; `due` says when."""

    def __init__(self, cfg: TrainConfig, ema: EMA, manifest: Manifest, latent_shape: Sequence[int],
                 device: torch.device, monitor: Monitor):
        self.cfg, self.ema, self.manifest, self.latent_shape = cfg, ema, manifest, tuple(latent_shape)
        self.device, self.monitor = device, monitor

    def due(self, step: int) -> bool:
        """Whether a grid follows the step just finished (1-based): every monitor.sample_every steps
        before the last (the final grid comes after the loop)."""
        every = self.cfg.monitor.sample_every
        return bool(every) and step % every == 0 and step != self.cfg.run.total_steps

    def make(self, step: int) -> str:
        """Sample a grid from the EMA weights, log it and write it as PNG; returns the path."""
        m = self.cfg.monitor
        z = preview_grid(self.cfg.diffusion.denoiser(self.ema.module), m.sample_count, m.sample_steps,
                         m.guidance_scale, self.latent_shape, self.manifest.num_classes, self.device,
                         seed=self.cfg.run.seed)
        grid = make_grid(decode_latents(z, self.manifest.scaling_factor, self.manifest.encoder))
        self.monitor.image("samples/ema", grid, step)
        return save_png(grid, os.path.join(self.cfg.run.run_dir(), "samples", f"step{step:08d}.png"))
