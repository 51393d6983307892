"""The digit classifier network that judges the digits demo (trained and cached by
trainer.evaluation.digits): any image size in, grey 8x8 canonical input, 128-d features, 10 logits."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SIDE = 8
FEATURE_DIM = 128


class DigitsClassifier(nn.Module):
    """Two 3x3 convolutions, a 128-d hidden layer (the features) and 10 logits; input [N, 1, 8, 8]."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.width = width
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.hidden = nn.Linear(2 * width * 16, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [N, 128]."""
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return F.relu(self.hidden(F.max_pool2d(x, 2).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, 10]."""
        return self.head(self.features(x))


def canonical(images: np.ndarray | torch.Tensor, side: int = SIDE) -> torch.Tensor:
    """uint8 images [N, H, W, 3] (or grey [N, H, W]) -> float [N, 1, side, side] in [0, 1] (default
    8x8; the MNIST judge uses 32x32): grey, resized (bilinear, antialiased) unless already that size."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim == 4:
        x = x.float().mean(dim=-1)
    if x.ndim != 3:
        raise ValueError(f"expected images [N, H, W, 3] or [N, H, W], got shape {tuple(x.shape)}")
    x = x.float().div(255.0)[:, None]
    if tuple(x.shape[-2:]) != (side, side):
        x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return x
