"""MaskDiT (Zheng et al. 2023): DiT encoder on the kept tokens only, a light decoder on all tokens."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .backbone import BlockStack, SkipCache
from .dit import DiT
from .layers import (
    FinalLayer,
    ModelOutput,
    gather_tokens,
    random_token_mask,
    sincos_pos_embed_2d,
    unpatchify,
)

DECODER_EMBEDS = ("linear", "adaln")
"""MaskDiT's decoder_embed choices."""


class MaskDiT(DiT):
    """Asymmetric masked diffusion transformer.

    With mask_ratio r > 0 each sample keeps the same number of random tokens (a different set per
    sample); all `depth` encoder blocks run on those only, a learned mask token fills the dropped
    positions and `decoder_depth` narrow blocks run on the full sequence. r = 0 is the full
    sequence, used for inference and unmask tuning.

    decoder_embed: how encoder tokens enter the decoder's width. 'linear' (a plain Linear) or
    'adaln' (LayerNorm, shift and scale from the conditioning, then a Linear: the published
    MaskDiT's `decoder_layer`, needed to load its releases exactly; it adds 2 x hidden_size^2
    weights, negligible FLOPs).
    """

    can_mask: ClassVar[bool] = True
    family: ClassVar[str] = "maskdit"

    def __init__(
        self,
        *args,
        decoder_depth: int = 8,
        decoder_hidden_size: int = 512,
        decoder_num_heads: int = 16,
        decoder_embed: str = "linear",
        learn_sigma: bool = False,
        **kwargs,
    ):
        if decoder_embed not in DECODER_EMBEDS:
            raise ValueError(f"decoder_embed must be one of {', '.join(DECODER_EMBEDS)}, got {decoder_embed!r}")
        self.decoder_embed_kind = decoder_embed
        self.decoder_depth = decoder_depth
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_num_heads = decoder_num_heads
        super().__init__(*args, learn_sigma=learn_sigma, **kwargs)

    def _build_head(self, num_heads: int, mlp_ratio: float) -> None:
        width = self.decoder_hidden_size
        if self.decoder_embed_kind == "adaln":
            # the release's DecoderLayer: the same norm / modulation / projection as a final layer
            # whose "patch" is one token of decoder width
            self.decoder_layer = FinalLayer(self.hidden_size, 1, width, cond_dim=self.hidden_size)
        else:
            self.decoder_embed = nn.Linear(self.hidden_size, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(width, self.grid_size), persistent=False)
        # Decoder blocks read the encoder-width conditioning directly through their adaLN.
        self.decoder = BlockStack(self.decoder_depth, width, self.decoder_num_heads, mlp_ratio, skip=False,
                                  cond_dim=self.hidden_size)
        self.final_layer = FinalLayer(width, self.patch_size, self.out_channels, cond_dim=self.hidden_size)

    def initialize_weights(self) -> None:
        """DiT's initialisation plus MAE's small normal init of the mask token."""
        super().initialize_weights()
        nn.init.normal_(self.mask_token, std=0.02)

    def set_checkpointing(self, mode: str, offload: bool = False) -> None:
        """Per-block activation checkpointing for encoder and decoder blocks."""
        super().set_checkpointing(mode, offload)
        self.decoder.set_checkpointing(mode, offload)

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
        """Predict every position; returns the prediction and the mask (None when r = 0). hidden_at
        = k > 0 also returns the kept tokens leaving encoder block k and their positions."""
        if mask_ratio and (skip_cache is not None or reuse_cache):
            raise ValueError("Skip-Cache is a sampling mode: use it with mask_ratio 0")
        tokens, c = self.embed(x, t, y)
        token_mask = None
        if mask_ratio > 0:
            token_mask = random_token_mask(x.shape[0], self.num_tokens, mask_ratio, x.device)
            tokens = gather_tokens(tokens, token_mask.ids_keep)
        elif mask_ratio < 0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        tap: list | None = [] if hidden_at else None
        h = self.blocks(tokens, c, skip_cache, reuse_cache, tap, hidden_at)
        h = self.decoder_layer(h, c) if self.decoder_embed_kind == "adaln" else self.decoder_embed(h)
        batch, kept, width = h.shape
        # At r = 0 the fill is empty but still part of the graph, so the mask token receives a
        # zero gradient instead of none and ZeRO / DDP see every parameter used.
        fill = self.mask_token.to(h.dtype).expand(batch, self.num_tokens - kept, width)
        h = torch.cat([h, fill], dim=1)
        if token_mask is not None:
            h = gather_tokens(h, token_mask.ids_restore)
        h = self.decoder(h + self.decoder_pos_embed.to(h.device, h.dtype), c)
        out = unpatchify(self.final_layer(h, c), self.patch_size, self.out_channels, self.grid_size)
        if token_mask is None:
            return ModelOutput(out, None, tap[0] if tap else None)
        return ModelOutput(out, token_mask.mask, tap[0] if tap else None, token_mask.ids_keep if tap else None)
