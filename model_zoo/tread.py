"""TREAD (Krause et al., ICCV 2025): a random share of the tokens bypasses a run of DiT blocks."""

from __future__ import annotations

from typing import ClassVar

import torch

from .backbone import SkipCache
from .layers import ModelOutput, unpatchify
from .sparse import TokenSparseDiT


class TreadDiT(TokenSparseDiT):
    """TREAD: Token Routing for Efficient Architecture-agnostic Diffusion Training, on DiT.

    With mask_ratio r > 0 a random share r of the tokens (a different set per sample) is taken out
    after block route_start - 1, bypasses blocks [route_start, route_end) and is scattered back
    unchanged in front of block route_end; the others run through those blocks. No parameter is
    added: the weights are DiT's, at r = 0 it computes exactly DiT, and sampling runs dense. The
    loss covers every token.

    Defaults: route_start 2 and route_end depth - 3, i.e. the paper's route i = 2 -> j = depth - 4
    ("absolute scaling", best for every tested size) with the release's end_layer_idx j inclusive
    (its dit.py runs block j on the routed tokens, then scatters). DiT-B/2's published route
    {start_layer_idx: 2, end_layer_idx: 8} is route_start 2, route_end 9 here.
    """

    family: ClassVar[str] = "tread"

    def __init__(self, *args, route_start: int = 2, route_end: int | None = None, **kwargs):
        self.route_start = route_start
        self.route_end = route_end
        super().__init__(*args, **kwargs)

    def _check_layout(self) -> None:
        """0 <= route_start < route_end <= depth; route_end None is depth - 3."""
        end = self.depth - 3 if self.route_end is None else self.route_end
        if not 0 <= self.route_start < end <= self.depth:
            raise ValueError(f"route_start {self.route_start} and route_end {end} must satisfy "
                             f"0 <= route_start < route_end <= depth {self.depth}")
        self.route_end = end
        self.sparse_start, self.sparse_end = self.route_start, end

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
        """Predict every position (mask=None: the loss covers every token). mask_ratio: the share
        of tokens routed around blocks [route_start, route_end). hidden_at=k > 0 also returns the
        tokens leaving block k: for a routed block at r > 0 the ones it saw, with their positions."""
        tokens, c, token_mask, tap = self._prepare(x, t, y, mask_ratio, skip_cache, reuse_cache, hidden_at)
        start, end = self.route_start, self.route_end
        h = self.blocks.run_range(tokens, c, 0, start, tap, hidden_at)               # [B, N, D]
        if token_mask is None:
            h = self.blocks.run_range(h, c, start, end, tap, hidden_at)              # [B, N, D]
        else:
            index = token_mask.ids_keep.unsqueeze(-1).expand(-1, -1, h.shape[-1])    # [B, K, D]
            kept = self.blocks.run_range(torch.gather(h, 1, index), c, start, end, tap, hidden_at)  # [B, K, D]
            # out of place: the bypassing tokens re-enter exactly as they left block start - 1
            h = h.scatter(1, index, kept)                                            # [B, N, D]
        h = self.blocks.run_range(h, c, end, self.depth, tap, hidden_at)             # [B, N, D]
        out = unpatchify(self.final_layer(h, c), self.patch_size, self.out_channels, self.grid_size)
        hidden, keep_ids = self._hidden(tap, hidden_at, token_mask)
        return ModelOutput(out, None, hidden, keep_ids)
