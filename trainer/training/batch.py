"""What the latent stream is asked for (`LoaderOptions`) and what it yields (`Batch`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass
class LoaderOptions:
    """Options of the latent stream (all per rank unless said otherwise)."""

    batch_size: int
    """Samples per batch on this rank."""
    num_workers: int = 2
    """DataLoader worker processes (0: read in the main process)."""
    seed: int = 0
    """Base seed; combined with rank, reader (worker) and epoch."""
    resampled: bool = True
    """Infinite resampled stream with fixed-size epochs (training); False: each sample exactly
    once per epoch (evaluation; ranks may then see different batch counts)."""
    epoch_samples: int | None = None
    """Samples per epoch over all ranks (resampled mode); default: the manifest's sample count."""
    shuffle_buffer: int = 1000
    """Samples held per worker for shuffling (0 or 1: no shuffling beyond shard order)."""
    hflip: bool = True
    """Use the flipped latent with probability 1/2 when the dataset has one."""
    sample_posterior: bool = True
    """z = mean + std * eps; False: z = mean."""
    scaling_factor: float | None = None
    """Override the manifest's scaling factor."""
    drop_last: bool = False
    """Non-resampled mode: drop each worker's last partial batch."""
    pin_memory: bool | None = None
    """Pin host memory; default: on when the accelerator is not the CPU."""
    manifest: str | None = None
    """Manifest path or URL when ``shards`` is a pattern whose directory has none."""
    return_keys: bool = False
    """Fill ``Batch.keys`` with the samples' keys; for tests and evaluation."""
    return_draws: bool = False
    """Fill ``Batch.draws`` (flip choices, noise); for tests that recompute z from the shards. Off
    in training: the noise copy costs a batch of memory."""
    max_warnings: int = 20
    """Warnings logged per worker before they are only counted."""
    holdout_fraction: float = 0.0
    """Share of the shards (the last ones) held out from training for validation."""
    split: str = "train"
    """With holdout_fraction: 'train' reads the other shards, 'holdout' only the held-out ones."""
    features: bool = False
    """Fill ``Batch.features`` with each sample's teacher features (representation alignment)."""


class Draws(NamedTuple):
    """What the stream drew for one batch (``LoaderOptions.return_draws``)."""

    flip: torch.Tensor
    """bool [B]: sample i was taken from its flipped latent (``latent_flip.npy``)."""
    eps: torch.Tensor | None
    """float32 [B, C, H, W]: the noise of ``z = (mean + std * eps) * scale``, exactly as used;
    None when no noise was drawn (single-moment data or ``sample_posterior=False``)."""


@dataclass
class Batch:
    """One batch of the latent stream: ``latents`` as trained and ``labels``, plus what the options
    asked for (None otherwise)."""

    latents: torch.Tensor
    """float32 [B, C, H, W]: ``z = (mean + std * eps) * scale`` (or the mean, without posterior
    sampling), from the flipped latent where a flip was drawn."""
    labels: torch.Tensor
    """long [B]: class indices."""
    features: torch.Tensor | None = None
    """float16 [B, D, G, G]: the teacher's patch features of each sample (of its flipped image when
    the flip was drawn); ``LoaderOptions.features``."""
    keys: list[str] | None = None
    """The samples' keys in their shards; ``LoaderOptions.return_keys``."""
    draws: Draws | None = None
    """What was drawn for this batch; ``LoaderOptions.return_draws``."""

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> Batch:
        """The tensors the step uses (latents, labels, features) on `device`, without waiting for
        the copy (pinned memory makes it asynchronous on accelerators)."""
        features = self.features.to(device, non_blocking=True) if self.features is not None else None
        return Batch(self.latents.to(device, non_blocking=True), self.labels.to(device, non_blocking=True), features,
                     self.keys, self.draws)

    def pin_memory(self) -> Batch:
        """Page-locked copies of the tensors (the DataLoader's pin_memory thread calls this)."""
        features = self.features.pin_memory() if self.features is not None else None
        return Batch(self.latents.pin_memory(), self.labels.pin_memory(), features, self.keys, self.draws)
