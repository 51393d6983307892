"""The one count of a run's training FLOPs: what the run adds to its train_flops every step and
what a study's FLOPs budget is laid out in, so the two can never disagree.

Per image at a mask ratio: the network's forward + backward (model_zoo.flops, counted once per
ratio on the meta device) plus, with representation alignment, the head's forward + backward on
every token the aligned block saw (the kept ones when that block is sparse). The frozen teacher
costs nothing here: its features were computed once, when the shards were encoded.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch

from model_zoo.flops import FlopsPerImage
from model_zoo.registry import build_model

from .schema import TrainConfig


def align_head_flops_per_token(width: int, hidden: int, out: int) -> float:
    """Training FLOPs per token of REPA's projector (Linear, SiLU, Linear, SiLU, Linear from
    `width` through two `hidden` layers to `out`): forward + backward = 3 x 2 x its multiply-adds."""
    return 6.0 * (width * hidden + hidden * hidden + hidden * out)


class TrainingFlops:
    """Training FLOPs per image of a launch config's network on data of `latent_shape` and
    `num_classes` at a mask ratio (`flops(ratio)`), the alignment head included when
    align.lambda_align > 0 (`feature_dim`: the teacher's feature width, from the manifest)."""

    def __init__(self, cfg: TrainConfig, latent_shape: Sequence[int], num_classes: int,
                 feature_dim: int | None = None):
        self.name, self.kwargs = cfg.model.name, cfg.model_kwargs(latent_shape, num_classes)
        self.network = FlopsPerImage(self.name, self.kwargs)
        self.head_per_token, self.align_block = 0.0, 0
        if cfg.align.enabled:
            if feature_dim is None:
                raise ValueError("align.lambda_align > 0: the teacher features' width is needed to count the head")
            with torch.device("meta"):
                net = build_model(self.name, **self.kwargs)
            self.align_block = cfg.align.block_for(net.depth)
            self.head_per_token = align_head_flops_per_token(net.hidden_size, cfg.align.head_hidden, feature_dim)
        self._aligned: Dict[float, int] = {}

    def __call__(self, mask_ratio: float) -> float:
        """Training FLOPs of one image at `mask_ratio`."""
        flops = self.network(mask_ratio)
        if self.head_per_token:
            flops += self.head_per_token * self.aligned_tokens(mask_ratio)
        return flops

    def aligned_tokens(self, mask_ratio: float) -> int:
        """How many tokens leave the aligned block at `mask_ratio` (asked of the network itself, on
        the meta device: dense and sparse blocks differ by family)."""
        key = round(mask_ratio, 2)  # the network's own count is cached the same way
        if key not in self._aligned:
            with torch.device("meta"):
                net = build_model(self.name, **self.kwargs)
                n = 1
                x = torch.zeros(n, net.in_channels, net.input_size, net.input_size)
                out = net(x, torch.ones(n), torch.zeros(n, dtype=torch.long), mask_ratio=key,
                          hidden_at=self.align_block)
            self._aligned[key] = int(out.hidden.shape[1])
        return self._aligned[key]
