"""Building blocks shared by DiT and MaskDiT: embedders, adaLN-Zero block, skip fusion, masking."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class ModelOutput(NamedTuple):
    """What every registry network returns.

    sample: prediction for every position, [B, out_channels, H, W].
    mask: [B, N_tokens] float, 1 where the token was dropped from the encoder, 0 where kept;
        None when nothing was masked (mask ratio 0, or a network without masking).
    hidden: with forward(..., hidden_at=k), the tokens leaving encoder block k (1-based) [B, K, D]:
        the kept tokens only when masked (K = kept count), else every token; None otherwise.
    keep_ids: [B, K] the positions of hidden's tokens in the full grid when masked, else None.
    """

    sample: torch.Tensor
    mask: torch.Tensor | None
    hidden: torch.Tensor | None = None
    keep_ids: torch.Tensor | None = None


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of token features x [B, N, D] by per-sample shift/scale [B, D]."""
    # One fused kernel instead of three passes over the activations (elementwise work dominates
    # small-width steps on CPU).
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table [grid_size**2, dim], row-major over the patch grid.

    Half the channels encode the row, half the column, as in MAE / DiT, so a checkpoint trained
    at one resolution can be interpolated to another.
    """
    if dim % 4 != 0:
        raise ValueError(f"position embedding width must be divisible by 4, got hidden size {dim}")
    coords = np.arange(grid_size, dtype=np.float64)
    rows, cols = np.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    # DiT's table puts the column (w) encoding first; keep that order so weights port across.
    table = np.concatenate([encode(cols), encode(rows)], axis=1)
    return torch.from_numpy(table).float()


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches of a [B, C, H, W] latent -> tokens [B, N, D]."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed patches; H and W must be multiples of the patch size."""
        return rearrange(self.proj(x), "b d h w -> b (h w) d")


class TimestepEmbedder(nn.Module):
    """Scalar noise conditioning (timestep or c_noise) -> [B, D] via sinusoids and an MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_size = frequency_size
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def sinusoids(self, t: torch.Tensor) -> torch.Tensor:
        """Sinusoidal features of t [B] -> [B, frequency_size] (float32 for precision)."""
        half = self.frequency_size // 2
        freqs = torch.exp(
            -math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.frequency_size % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Embed noise conditioning t [B]."""
        freq = self.sinusoids(t).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)


class LabelEmbedder(nn.Module):
    """Class labels -> [B, D]; row num_classes is the null class used for classifier-free guidance.

    In training mode each label is replaced by the null class with probability dropout_prob so that
    one network learns both the conditional and the unconditional model.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Embed labels [B] (long); value num_classes means 'no class'."""
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


ATTENTION_BACKENDS = ("auto", "sdpa", "math")
_attention_backend = "auto"


@contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Within the block, attention uses `name`: 'auto' (default), 'sdpa' or 'math' (matmul + softmax).

    'auto' is SDPA except for half-precision training on CPU, where torch's CPU flash-attention
    backward is about 2x slower than the two matmuls and softmax it replaces (benchmarks/README).
    """
    global _attention_backend
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (choose from {', '.join(ATTENTION_BACKENDS)})")
    previous, _attention_backend = _attention_backend, name
    try:
        yield
    finally:
        _attention_backend = previous


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, training: bool = False) -> torch.Tensor:
    """Softmax attention of q, k, v [B, H, N, Dh] by the current backend (see attention_backend).

    training: the calling module's mode. 'auto' keys on it rather than on grad mode so that a
    reentrant activation checkpoint (first forward without grad, recompute with grad) runs the
    same kernel both times.
    """
    backend = _attention_backend
    if backend == "auto":
        cpu_half_train = training and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
        backend = "math" if cpu_half_train else "sdpa"
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    # Scaling q costs N*Dh multiplies per head instead of N*N on the scores.
    scores = torch.matmul(q * (q.shape[-1] ** -0.5), k.transpose(-2, -1))
    return torch.matmul(scores.softmax(dim=-1), v)


class Attention(nn.Module):
    """Multi-head self-attention; through scaled_dot_product_attention (flash / fused when available)
    except where `attention` picks the faster matmul form."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over all tokens of x [B, N, D]."""
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        out = attention(q, k, v, self.training)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU, as in DiT."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP token-wise."""
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: the block starts as the identity.

    cond_dim may differ from the block width (MaskDiT's narrow decoder is conditioned on the
    encoder-width embedding).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, cond_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [B, N, D] tokens, c [B, cond_dim] conditioning."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = torch.addcmul(x, gate1.unsqueeze(1), self.attn(modulate(self.norm1(x), shift1, scale1)))
        return torch.addcmul(x, gate2.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift2, scale2)))


class SkipFusion(nn.Module):
    """Skip-DiT long-skip fusion: concat(h, skip) -> LayerNorm(2D) -> Linear(2D -> D)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(2 * hidden_size, eps=1e-6)
        self.linear = nn.Linear(2 * hidden_size, hidden_size)

    def forward(self, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Fuse the running hidden state with the matching shallow block's output."""
        return self.linear(self.norm(torch.cat([h, skip], dim=-1)))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm + linear projection of each token to its patch of outputs."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, cond_dim: int | None = None):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Tokens [B, N, D] -> per-token patch predictions [B, N, p*p*out_channels]."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, p*p*C], tokens row-major over the patch grid (matches unpatchify)."""
    return rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)


def unpatchify(tokens: torch.Tensor, patch_size: int, channels: int, grid_h: int) -> torch.Tensor:
    """[B, N, p*p*C] -> [B, C, H, W]; inverse of patchify."""
    return rearrange(
        tokens, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=grid_h, p1=patch_size, p2=patch_size, c=channels
    )


class TokenMask(NamedTuple):
    """Indices of one random masking of a batch (a different token set per sample).

    ids_keep [B, K]: positions fed to the encoder; ids_restore [B, N]: for each original position
    its index in the shuffled order (inverts the shuffle); mask [B, N]: 1 = dropped.
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


def kept_token_count(num_tokens: int, mask_ratio: float) -> int:
    """How many tokens survive masking; the same for every sample of a batch."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, int(num_tokens * (1.0 - mask_ratio)))


def canonical_mask_ratio(num_tokens: int, mask_ratio: float) -> float:
    """One representative mask ratio per kept-token count: every ratio that keeps the same number
    of tokens maps to the same float (0.0 for no masking). torch.compile guards on the float a
    network is called with, so feeding it this compiles once per token count, not once per ratio."""
    keep = kept_token_count(num_tokens, mask_ratio)
    # the middle of the interval of ratios that keep `keep` tokens: int() cannot round it away
    return 0.0 if keep == num_tokens else 1.0 - (keep + 0.5) / num_tokens


def random_token_mask(
    batch: int, num_tokens: int, mask_ratio: float, device: torch.device, generator: torch.Generator | None = None
) -> TokenMask:
    """Draw a per-sample random permutation (argsort of uniform noise) and keep its first K tokens."""
    keep = kept_token_count(num_tokens, mask_ratio)
    noise = torch.rand(batch, num_tokens, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, num_tokens, device=device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return TokenMask(ids_shuffle[:, :keep], ids_restore, mask)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Select tokens ids [B, K] from x [B, N, D] -> [B, K, D]."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def init_dit_weights(module: nn.Module) -> None:
    """DiT initialisation: xavier linears, zero biases; zero adaLN modulation and final layer.

    Zeroed modulation makes every block start as the identity (adaLN-Zero) and the zeroed final
    layer makes the untrained network predict zero, which stabilises early training.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, PatchEmbed):
            w = m.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(m.proj.bias)
        elif isinstance(m, LabelEmbedder):
            nn.init.normal_(m.embedding_table.weight, std=0.02)
        elif isinstance(m, TimestepEmbedder):
            nn.init.normal_(m.mlp[0].weight, std=0.02)
            nn.init.normal_(m.mlp[2].weight, std=0.02)
        elif isinstance(m, (AdaLNBlock, FinalLayer)):
            nn.init.zeros_(m.adaLN_modulation[-1].weight)
            nn.init.zeros_(m.adaLN_modulation[-1].bias)
            if isinstance(m, FinalLayer):
                nn.init.zeros_(m.linear.weight)
                nn.init.zeros_(m.linear.bias)
