"""FID: Inception-v3 pool features (the TensorFlow FID graph, model_zoo.inception) and their
Frechet distance."""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from torch import nn

from model_zoo.inception import load_fid_inception

from ..distributed import accelerator_device
from .frechet import feature_stats, frechet_distance


@torch.no_grad()
def inception_features(images: np.ndarray, model: nn.Module | None = None, weights: str | None = None,
                       batch_size: int = 50,
                       device: torch.device | None = None) -> np.ndarray:
    """2048-d pool features [N, 2048] (float64) of uint8 RGB images [N, H, W, 3]. `model` gets float32
    [N, 3, H, W] batches with values 0..255 (the FID network resizes and normalises them itself)."""
    device = device or accelerator_device()
    model = model if model is not None else load_fid_inception(weights, device)
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).to(device)
        x = x.permute(0, 3, 1, 2).float()  # 0..255, as the TF FID graph takes them
        out.append(model(x).double().cpu().numpy())
    return np.concatenate(out)


def fid(generated: np.ndarray, reference: np.ndarray | Tuple[np.ndarray, np.ndarray], weights: str | None = None,
        batch_size: int = 50, model: nn.Module | None = None) -> float:
    """FID between uint8 image sets (reference may be precomputed (mu, sigma))."""
    model = model if model is not None else load_fid_inception(weights, accelerator_device())
    device = next(model.parameters()).device
    gen = feature_stats(inception_features(generated, model, batch_size=batch_size, device=device))
    if isinstance(reference, tuple):
        ref = reference
    else:
        ref = feature_stats(inception_features(reference, model, batch_size=batch_size, device=device))
    return frechet_distance(*gen, *ref)
