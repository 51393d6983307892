"""The digit classifier network that judges MNIST generations (trained and cached by
trainer.evaluation.mnist): any image size in, grey 32x32 canonical input (MNIST's 28x28 digits
padded by 2, as the mnist source stores them), 128-d features, 10 logits."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .digits_classifier import FEATURE_DIM
from .digits_classifier import canonical as _canonical

SIDE = 32


class MnistClassifier(nn.Module):
    """Three 3x3 convolutions with batch norm, each followed by a 2x2 max pool (32 -> 4), a 128-d
    hidden layer (the features) and 10 logits; input [N, 1, 32, 32]."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.width = width
        chans = (1, width, 2 * width, 4 * width)
        self.convs = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1) for i in range(3))
        self.norms = nn.ModuleList(nn.BatchNorm2d(chans[i + 1]) for i in range(3))
        # 1,000 training images: dropout before the hidden layer is worth about half a point of accuracy
        self.dropout = nn.Dropout(0.3)
        self.hidden = nn.Linear(4 * width * (SIDE // 8) ** 2, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [N, 128]."""
        for conv, norm in zip(self.convs, self.norms):
            x = F.max_pool2d(F.relu(norm(conv(x))), 2)
        return F.relu(self.hidden(self.dropout(x.flatten(1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, 10]."""
        return self.head(self.features(x))


def canonical(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images [N, H, W, 3] (or grey [N, H, W]) -> float [N, 1, 32, 32] in [0, 1]."""
    return _canonical(images, SIDE)
