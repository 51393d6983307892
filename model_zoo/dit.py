"""DiT (Peebles & Xie 2023), the baseline diffusion transformer, with optional Skip-DiT branches."""

from __future__ import annotations

from typing import ClassVar, Tuple

import torch
from torch import nn

from .backbone import BlockStack, SkipCache
from .layers import (
    FinalLayer,
    LabelEmbedder,
    ModelOutput,
    PatchEmbed,
    TimestepEmbedder,
    init_dit_weights,
    sincos_pos_embed_2d,
    unpatchify,
)


class DiT(nn.Module):
    """Class-conditional diffusion transformer on latent patches.

    forward(x, t, y) maps a noisy latent x [B, C, H, W], its noise conditioning t [B] and labels
    y [B] (num_classes = no class) to a prediction of shape [B, out_channels, H, W]. What the
    prediction means (epsilon, x0, EDM's F) is the diffusion code's business, not the network's.
    """

    can_mask: ClassVar[bool] = False
    """Whether forward accepts mask_ratio > 0 (drops tokens in training); the registry and the
    config validation ask it."""
    family: ClassVar[str] = "dense"
    """What the network does with tokens: 'dense', 'maskdit', 'sprint' or 'tread'."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        skip: bool = False,
    ):
        super().__init__()
        if input_size % patch_size != 0:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_classes = num_classes
        self.skip = skip
        self.grid_size = input_size // patch_size
        self.num_tokens = self.grid_size**2

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # A buffer, not a parameter: the table is fixed, so optimisers and ZeRO never see it and
        # checkpoints need not store it (it is rebuilt from the shape).
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid_size), persistent=False)
        self.blocks = BlockStack(depth, hidden_size, num_heads, mlp_ratio, skip)
        self._build_head(num_heads, mlp_ratio)
        # Under DeepSpeed's zero.Init the parameters are already partitioned (empty) here; the
        # trainer re-runs initialize_weights with them gathered.
        if not any(hasattr(p, "ds_shape") and p.numel() == 0 for p in self.parameters()):
            self.initialize_weights()

    def initialize_weights(self) -> None:
        """(Re)apply DiT's initialisation; under ZeRO-3 call it inside GatheredParameters."""
        init_dit_weights(self)

    def _build_head(self, num_heads: int, mlp_ratio: float) -> None:
        """Layers after the encoder blocks; MaskDiT replaces these with its decoder."""
        self.final_layer = FinalLayer(self.hidden_size, self.patch_size, self.out_channels)

    def set_checkpointing(self, mode: str, offload: bool = False) -> None:
        """Per-block activation checkpointing: 'none', 'torch', 'deepspeed' or 'fairscale'."""
        self.blocks.set_checkpointing(mode, offload)

    def new_skip_cache(self, n_keep: int) -> SkipCache:
        """A fresh Skip-Cache keeping the first and last n_keep blocks on cached steps."""
        if not self.skip:
            raise ValueError("Skip-Cache needs a model built with skip=True")
        return SkipCache(n_keep, self.depth)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens with position embedding [B, N, D] and the conditioning vector [B, D]."""
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected input of shape [B, {', '.join(map(str, expected))}], got {list(x.shape)}")
        # Inputs follow the weights' dtype, so a bf16 / fp16 engine can be fed float32 latents.
        x = x.to(self.x_embedder.proj.weight.dtype)
        tokens = self.x_embedder(x) + self.pos_embed.to(x.device, x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y)
        return tokens, c

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        mask_ratio: float = 0.0,
        skip_cache: SkipCache | None = None,
        reuse_cache: bool = False,
        hidden_at: int = 0,
    ) -> ModelOutput:
        """Predict for every position; DiT never masks, so mask_ratio must be 0. hidden_at=k > 0
        also returns the tokens leaving block k (representation alignment)."""
        if mask_ratio != 0:
            raise ValueError(f"DiT does not mask tokens (mask_ratio={mask_ratio}); use a MaskDiT model")
        tokens, c = self.embed(x, t, y)
        tap: list | None = [] if hidden_at else None
        h = self.blocks(tokens, c, skip_cache, reuse_cache, tap, hidden_at)
        out = self.final_layer(h, c)
        return ModelOutput(unpatchify(out, self.patch_size, self.out_channels, self.grid_size), None,
                           tap[0] if tap else None)
