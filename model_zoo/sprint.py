"""SPRINT (Park et al., ICLR 2026): a sparse deep path fused with a dense shallow one, on DiT blocks."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .backbone import SkipCache
from .layers import ModelOutput, TokenMask, gather_tokens, unpatchify
from .sparse import TokenSparseDiT


class SprintDiT(TokenSparseDiT):
    """SPRINT: Sparse-Dense Residual Fusion for Efficient Diffusion Transformers, on DiT's blocks.

    Blocks [0, dense_in) run on every token (the dense path). The middle blocks [dense_in,
    depth - dense_out) run on the kept tokens only when mask_ratio r > 0 (the sparse path; the
    paper pre-trains at r = 0.75 and fine-tunes at r = 0). A learned mask token fills the dropped
    positions, concat([sparse path, dense path]) -> Linear(2D, D) (the release's residual_type
    'concat_linear') fuses the two, and blocks [depth - dense_out, depth) and the final layer run on
    every token, so the loss covers every token. At r = 0 it is a dense network, still fused.

    Path drop (the release's cfg_mask_prob): in train mode each sample, drawn independently of the
    label dropout, has its whole sparse-path output replaced by mask tokens with probability
    path_drop_prob, so the fused blocks also learn to predict from the dense path alone. Sampling
    forces it through forward's `path_drop` to build path-drop guidance's weak branch.
    """

    family: ClassVar[str] = "sprint"

    def __init__(self, *args, dense_in: int = 2, dense_out: int = 2, path_drop_prob: float = 0.1, **kwargs):
        if not 0.0 <= path_drop_prob <= 1.0:
            raise ValueError(f"path_drop_prob must be in [0, 1], got {path_drop_prob}")
        self.dense_in = dense_in
        self.dense_out = dense_out
        self.path_drop_prob = path_drop_prob
        super().__init__(*args, **kwargs)

    def _check_layout(self) -> None:
        """dense_in and dense_out leave at least one middle block."""
        if self.dense_in < 0 or self.dense_out < 0 or self.depth - self.dense_in - self.dense_out < 1:
            raise ValueError(f"dense_in {self.dense_in} and dense_out {self.dense_out} must be >= 0 and leave at "
                             f"least one block of depth {self.depth} for the sparse path")
        self.sparse_start, self.sparse_end = self.dense_in, self.depth - self.dense_out

    def _build_head(self, num_heads: int, mlp_ratio: float) -> None:
        super()._build_head(num_heads, mlp_ratio)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.hidden_size))
        self.fusion = nn.Linear(2 * self.hidden_size, self.hidden_size)

    def initialize_weights(self) -> None:
        """DiT's initialisation (the fusion is a Linear: xavier, zero bias) plus a small normal mask
        token, as MaskDiT's."""
        super().initialize_weights()
        nn.init.normal_(self.mask_token, std=0.02)

    def _draw_path_drop(self, path_drop: torch.Tensor | bool | None, batch: int,
                        device: torch.device) -> torch.Tensor | bool | None:
        """The samples [B] (bool) whose sparse path is dropped this call, True for all of them, or
        None for none."""
        if path_drop is True:
            return True
        if path_drop is not None and path_drop is not False:
            if tuple(path_drop.shape) != (batch,):
                raise ValueError(f"path_drop must have shape [{batch}], got {list(path_drop.shape)}")
            return path_drop.to(device=device, dtype=torch.bool)
        if self.training and self.path_drop_prob > 0:
            return torch.rand(batch, device=device) < self.path_drop_prob
        return None

    def _restore(self, h: torch.Tensor, ids_restore: torch.Tensor | None) -> torch.Tensor:
        """Kept tokens h [B, K, D] back at their positions, the mask token at the others: [B, N, D]."""
        batch, kept, width = h.shape
        # At r = 0 the fill is empty but still part of the graph, so the mask token receives a zero
        # gradient instead of none and ZeRO / DDP see every parameter used.
        fill = self.mask_token.to(h.dtype).expand(batch, self.num_tokens - kept, width)
        h = torch.cat([h, fill], dim=1)
        return h if ids_restore is None else gather_tokens(h, ids_restore)

    def _sparse_path(self, dense: torch.Tensor, c: torch.Tensor, token_mask: TokenMask | None,
                     drop: torch.Tensor | None, tap: list[torch.Tensor] | None, hidden_at: int) -> torch.Tensor:
        """The middle blocks on the kept tokens of `dense` [B, N, D], restored to [B, N, D], with
        the dropped samples' output replaced by mask tokens."""
        h = dense if token_mask is None else gather_tokens(dense, token_mask.ids_keep)  # [B, K, D]
        ids_restore = None if token_mask is None else token_mask.ids_restore
        start, end = self.sparse_start, self.sparse_end
        tapped_here = tap is not None and self.in_sparse_part(hidden_at)
        if drop is True:  # the whole batch drops its sparse path: the middle blocks do not run at all
            return self.mask_token.to(dense.dtype).expand_as(dense)                  # [B, N, D]
        if drop is not None and not self.training and not tapped_here:
            # Forced drop at sampling (path-drop guidance's weak branch): the middle runs only for
            # the samples that keep their sparse path, not at all when none does. That saving is
            # what makes the guidance cheap. (In train mode the graph must stay whole, below.)
            run = torch.nonzero(~drop).squeeze(1)                                    # [B_run]
            filled = self.mask_token.to(dense.dtype).expand_as(dense)                # [B, N, D]
            if run.numel() == 0:
                return filled
            part = self.blocks.run_range(h[run], c[run], start, end)                 # [B_run, K, D]
            part = self._restore(part, None if ids_restore is None else ids_restore[run])  # [B_run, N, D]
            return filled.index_copy(0, run, part)                                   # [B, N, D]
        h = self.blocks.run_range(h, c, start, end, tap, hidden_at)                  # [B, K, D]
        h = self._restore(h, ids_restore)                                            # [B, N, D]
        if drop is None:
            return h
        # Computed for every sample, then replaced: the random drop changes neither the FLOPs nor
        # the graph (every middle weight gets a gradient, zero from the dropped samples).
        return torch.where(drop[:, None, None], self.mask_token.to(h.dtype), h)     # [B, N, D]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        mask_ratio: float = 0.0,
        skip_cache: SkipCache | None = None,
        reuse_cache: bool = False,
        hidden_at: int = 0,
        path_drop: torch.Tensor | bool | None = None,
    ) -> ModelOutput:
        """Predict every position (mask=None: the loss covers every token).

        mask_ratio: the share of tokens that skip the middle blocks. path_drop [B] bool: the samples
        whose sparse-path output becomes mask tokens (forced; None draws it with path_drop_prob in
        train mode and drops nothing in eval mode; True drops it for the whole batch, which needs no
        data-dependent indexing, so it also runs on the meta device); in eval mode the middle blocks
        run only for the other samples. hidden_at=k > 0 also returns the tokens leaving block k: for a middle block
        at r > 0 the kept ones, with their positions as keep_ids.
        """
        tokens, c, token_mask, tap = self._prepare(x, t, y, mask_ratio, skip_cache, reuse_cache, hidden_at)
        drop = self._draw_path_drop(path_drop, tokens.shape[0], tokens.device)     # [B] or None
        dense = self.blocks.run_range(tokens, c, 0, self.sparse_start, tap, hidden_at)  # [B, N, D]
        sparse = self._sparse_path(dense, c, token_mask, drop, tap, hidden_at)      # [B, N, D]
        h = self.fusion(torch.cat([sparse, dense], dim=-1))                         # [B, N, D]
        h = self.blocks.run_range(h, c, self.sparse_end, self.depth, tap, hidden_at)  # [B, N, D]
        out = unpatchify(self.final_layer(h, c), self.patch_size, self.out_channels, self.grid_size)
        hidden, keep_ids = self._hidden(tap, hidden_at, token_mask)
        return ModelOutput(out, None, hidden, keep_ids)
