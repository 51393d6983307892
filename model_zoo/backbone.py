"""A stack of adaLN blocks with optional Skip-DiT long skips and the Skip-Cache forward mode."""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from .checkpointing import run_block, validate_mode, wrap_blocks
from .layers import AdaLNBlock, SkipFusion


class SkipCache:
    """State a sampler carries between steps for Skip-Cache (Skip-DiT) sampling.

    A refresh call runs every block and stores the hidden state that enters block depth - n_keep;
    a reuse call runs only the first n_keep and last n_keep blocks and takes the deep state from
    here. The counters let a sampler report what it executed.
    """

    def __init__(self, n_keep: int, depth: int):
        if not 1 <= n_keep <= depth // 2:
            raise ValueError(f"skip cache n_keep must be in [1, {depth // 2}] for depth {depth}, got {n_keep}")
        self.n_keep = n_keep
        self.depth = depth
        self.feature: torch.Tensor | None = None
        self.full_calls = 0
        self.cached_calls = 0
        self.blocks_run = 0

    def reset(self) -> None:
        """Forget the cached feature and zero the counters (start of a new sampling run)."""
        self.feature = None
        self.full_calls = self.cached_calls = self.blocks_run = 0


class BlockStack(nn.Module):
    """depth AdaLN blocks; with skip=True, block i's output also feeds block depth-1-i (Skip-DiT).

    Skips pair the outer blocks first: block 0 -> block depth-1, ..., so the first n and last n
    blocks form a closed sub-network, which is what makes Skip-Cache possible.
    """

    def __init__(self, depth: int, hidden_size: int, num_heads: int, mlp_ratio: float, skip: bool,
                 cond_dim: int | None = None):
        super().__init__()
        self.depth = depth
        self.skip = skip
        self.blocks = nn.ModuleList(
            [AdaLNBlock(hidden_size, num_heads, mlp_ratio, cond_dim) for _ in range(depth)]
        )
        # fusions[k] sits at the input of block depth - depth//2 + k, fed by block depth//2 - 1 - k.
        self.fusions = nn.ModuleList([SkipFusion(hidden_size) for _ in range(depth // 2)]) if skip else None
        self.checkpoint_mode = "none"

    def set_checkpointing(self, mode: str, offload: bool = False) -> None:
        """Choose the activation checkpointing implementation for every block ('none' disables)."""
        validate_mode(mode, offload)
        wrap_blocks(self.blocks, mode, offload)
        self.checkpoint_mode = mode

    def _block(self, i: int, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return run_block(self.blocks[i], self.checkpoint_mode, x, c)

    def _fuse(self, i: int, x: torch.Tensor, skips: List[torch.Tensor]) -> torch.Tensor:
        """Apply the long skip entering block i, if it has one."""
        first_deep = self.depth - self.depth // 2
        if self.fusions is None or i < first_deep:
            return x
        return self.fusions[i - first_deep](x, skips[self.depth - 1 - i])

    def run_range(self, x: torch.Tensor, c: torch.Tensor, start: int, end: int,
                  tap: List[torch.Tensor] | None = None, tap_after: int = 0) -> torch.Tensor:
        """Run blocks [start, end) on tokens x [B, K, D] (any token count K) with conditioning c.

        Token-sparse networks split the stack where their token set changes. tap / tap_after=k as
        in forward, for a k inside the range. Long skips would cross the split, so a stack built
        with skip=True refuses.
        """
        if self.skip:
            raise ValueError("a block range cannot carry Skip-DiT long skips (skip=True)")
        if not 0 <= start <= end <= self.depth:
            raise ValueError(f"block range [{start}, {end}) is not inside [0, {self.depth})")
        for i in range(start, end):
            x = self._block(i, x, c)
            if tap is not None and i == tap_after - 1:
                tap.append(x)
        return x

    def forward(self, x: torch.Tensor, c: torch.Tensor, cache: SkipCache | None = None,
                reuse_cache: bool = False, tap: List[torch.Tensor] | None = None,
                tap_after: int = 0) -> torch.Tensor:
        """Run the stack on tokens x [B, N, D] with conditioning c [B, cond_dim].

        cache=None: plain forward. cache given, reuse_cache=False: plain forward that also stores
        the state entering block depth - n_keep. reuse_cache=True: shallow + deep blocks only.
        tap / tap_after=k: append the output of block k (1-based) to `tap`. The state is taken
        from the forward's own data flow (not a hook), so it carries gradients under every
        activation-checkpointing mode, reentrant ones included.
        """
        if tap is not None and not 1 <= tap_after <= self.depth:
            raise ValueError(f"tap_after must be in [1, {self.depth}], got {tap_after}")
        if tap is not None and reuse_cache:
            raise ValueError("a block's state cannot be tapped on a Skip-Cache reuse step")
        if (cache is not None or reuse_cache) and not self.skip:
            raise ValueError("Skip-Cache needs a model built with skip=True")
        skips: List[torch.Tensor] = []
        n_shallow = self.depth // 2
        if reuse_cache:
            if cache is None or cache.feature is None:
                raise ValueError("reuse_cache=True but the skip cache holds no feature: run a refresh step first")
            if cache.feature.shape != x.shape:
                raise ValueError(f"skip cache holds a feature of shape {tuple(cache.feature.shape)}, "
                                 f"but this call's tokens are {tuple(x.shape)}: refresh the cache")
            n = cache.n_keep
            for i in range(n):
                x = self._block(i, x, c)
                skips.append(x)
            skips.extend([None] * (n_shallow - n))  # type: ignore[list-item]  # never read: pairs are closed
            x = cache.feature
            for i in range(self.depth - n, self.depth):
                x = self._block(i, self._fuse(i, x, skips), c)
            cache.cached_calls += 1
            cache.blocks_run += 2 * n
            return x
        for i in range(self.depth):
            if cache is not None and i == self.depth - cache.n_keep:
                cache.feature = x
            x = self._block(i, self._fuse(i, x, skips), c)
            if tap is not None and i == tap_after - 1:
                tap.append(x)
            if self.skip and i < n_shallow:
                skips.append(x)
        if cache is not None:
            cache.full_calls += 1
            cache.blocks_run += self.depth
        return x
