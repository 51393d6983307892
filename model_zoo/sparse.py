"""Token-sparse DiTs: in training some consecutive blocks run on a random subset of the tokens.

The shared base of SPRINT (`sprint.py`) and TREAD (`tread.py`). Unlike MaskDiT nothing is left
unpredicted: the blocks after the sparse part see every token again, so the loss covers every
token and forward returns mask=None. mask_ratio is the share of tokens that do not go through the
sparse blocks; the kept count comes from `kept_token_count`, so every ratio that keeps the same
number of tokens (`canonical_mask_ratio`) gives the same shapes and one torch.compile graph.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .backbone import SkipCache
from .dit import DiT
from .layers import TokenMask, random_token_mask


class TokenSparseDiT(DiT):
    """A DiT whose blocks [sparse_start, sparse_end) see only the kept tokens when mask_ratio > 0.

    Subclasses take their own layout options, set sparse_start / sparse_end in `_check_layout` and
    write forward from the pieces here. The blocks stay DiT's `blocks.blocks.N` (same parameter
    names, so a DiT checkpoint of the same size fills them). Skip-DiT long skips (skip=True) would
    connect a block that saw every token with one that sees a subset, so they are refused, and with
    them Skip-Cache.
    """

    can_mask: ClassVar[bool] = True

    sparse_start: int
    """First block (0-based) that runs on the kept tokens only."""
    sparse_end: int
    """One past the last such block: blocks sparse_end.. see every token again."""

    def _check_layout(self) -> None:
        """Validate the subclass's options against self.depth; set sparse_start / sparse_end."""
        raise NotImplementedError

    def _build_head(self, num_heads: int, mlp_ratio: float) -> None:
        # DiT.__init__ calls this once depth and the blocks exist: the first point where the
        # layout can be checked, and before any extra parameter is allocated.
        if self.skip:
            raise ValueError(f"skip=True (Skip-DiT long skips) cannot cross the sparse blocks of "
                             f"{type(self).__name__}; build it with skip=False")
        self._check_layout()
        super()._build_head(num_heads, mlp_ratio)

    def new_skip_cache(self, n_keep: int) -> SkipCache:
        """Refused: Skip-Cache needs long skips, which these networks cannot have."""
        raise ValueError(f"Skip-Cache needs long skips (skip=True), which {type(self).__name__} cannot have")

    def in_sparse_part(self, block: int) -> bool:
        """Whether 1-based block index `block` (as in hidden_at) is one of the sparse blocks."""
        return self.sparse_start < block <= self.sparse_end

    def _prepare(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        mask_ratio: float,
        skip_cache: SkipCache | None,
        reuse_cache: bool,
        hidden_at: int,
    ) -> tuple[torch.Tensor, torch.Tensor, TokenMask | None, list[torch.Tensor] | None]:
        """Check the call; return tokens [B, N, D], conditioning [B, D], the token subset (None at
        ratio 0) and the tap list for hidden_at (None when not asked)."""
        if skip_cache is not None or reuse_cache:
            raise ValueError(f"Skip-Cache needs long skips (skip=True), which {type(self).__name__} cannot have")
        if hidden_at and not 1 <= hidden_at <= self.depth:
            raise ValueError(f"hidden_at must be in [1, {self.depth}], got {hidden_at}")
        tokens, c = self.embed(x, t, y)
        token_mask = None
        if mask_ratio != 0:
            # random_token_mask refuses a ratio outside [0, 1) in one line (kept_token_count)
            token_mask = random_token_mask(x.shape[0], self.num_tokens, mask_ratio, tokens.device)
        return tokens, c, token_mask, ([] if hidden_at else None)

    def _hidden(self, tap: list[torch.Tensor] | None, hidden_at: int,
                token_mask: TokenMask | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """hidden and keep_ids for ModelOutput: a sparse block's kept tokens come with their
        positions, every other block's output is the whole grid (keep_ids None)."""
        if not tap:
            return None, None
        sparse = token_mask is not None and self.in_sparse_part(hidden_at)
        return tap[0], token_mask.ids_keep if sparse else None
