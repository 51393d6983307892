"""Exponential moving average of the network weights, correct under every ZeRO stage.

`EMA` keeps a whole float32 copy of the network on every rank (ZeRO stages 0-2). `ShardedEMA`
(ZeRO-3) keeps on each rank the average of that rank's own partition of every parameter, updated
from the partition without any gathering; the whole average exists only while it is needed
(`full()`: sample grids, in-loop evaluation) and is gathered to rank 0 for checkpoints.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..config import EMAConfig
from .engine import gathered, parameter_chunks


class EMA:
    """Float32 EMA of a network; `update` after optimizer steps, `module` for sampling."""

    def __init__(self, shadow: nn.Module, cfg: EMAConfig, images_per_step: int):
        self.module = shadow.float().eval().requires_grad_(False)
        self.cfg = cfg
        self.images_per_step = images_per_step
        self.updates = 0

    def decay(self, images_seen: int) -> float:
        """Decay for the next update, with the configured warm-up."""
        c = self.cfg
        if c.half_life_images is not None:
            half_life = c.half_life_images
            if c.warmup:
                # EDM's ramp: the half-life never exceeds 5% of the images seen so far.
                half_life = min(half_life, max(images_seen, self.images_per_step) * 0.05)
            return 0.5 ** (self.images_per_step * c.update_every / max(half_life, 1e-8))
        if c.warmup:
            return min(c.decay, (1 + self.updates) / (10 + self.updates))
        return c.decay

    @torch.no_grad()
    def copy_from(self, live: nn.Module) -> None:
        """Set the average to the live weights (start of training)."""
        self._blend(live, 0.0)

    def due(self, step: int) -> bool:
        """Whether the update after optimizer step `step` (1-based) is one of every `update_every`."""
        return step % self.cfg.update_every == 0

    def step_done(self, step: int, live: nn.Module, images_seen: int) -> bool:
        """Called after every optimizer step: update when due; returns whether it did."""
        if not self.due(step):
            return False
        self.update(live, images_seen)
        return True

    @torch.no_grad()
    def update(self, live: nn.Module, images_seen: int) -> None:
        """Blend the live weights in: ema = d * ema + (1 - d) * live."""
        self._blend(live, self.decay(images_seen))
        self.updates += 1

    def _blend(self, live: nn.Module, decay: float) -> None:
        shadow = dict(self.module.named_parameters())
        for params in parameter_chunks(live):
            with gathered([p for _, p in params]):
                for name, p in params:
                    target = shadow[name]
                    if decay == 0.0:
                        target.copy_(p.detach().float())
                    else:
                        target.lerp_(p.detach().to(target.device, torch.float32), 1.0 - decay)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The averaged weights (float32, parameter names of the network)."""
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def state_for_saving(self, rank: int) -> Dict[str, torch.Tensor]:
        """Called on every rank: the whole average on rank 0 (for the checkpoint), {} elsewhere."""
        return self.state_dict() if rank == 0 else {}

    @contextmanager
    def full(self, to_rank: int | None = None) -> Iterator[nn.Module | None]:
        """The whole averaged network for sampling, on every rank or on `to_rank` only (None
        elsewhere); enter it on every rank (a collective when sharded)."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        yield self.module if to_rank is None or rank == to_rank else None

    def tensor_bytes(self) -> int:
        """Bytes this rank holds for the average."""
        return sum(t.numel() * t.element_size() for t in self.module.state_dict().values())

    def load_state_dict(self, state: Dict[str, torch.Tensor], updates: int) -> None:
        """Restore the average and its update count (which drives the warm-up)."""
        self.module.load_state_dict(state)
        self.updates = updates


class ShardedEMA(EMA):
    """The EMA under ZeRO-3: each rank averages its own partition of every parameter (DeepSpeed's
    `param.ds_tensor`, the flattened parameter's [rank * n, (rank + 1) * n) slice, zero-padded at
    the end), so an update reads no other rank's weights and each rank holds 1/world of the average.

    The shadow network keeps its buffers; its parameters are empty except inside `full()`.
    """

    def __init__(self, shadow: nn.Module, cfg: EMAConfig, images_per_step: int, live: nn.Module):
        super().__init__(shadow, cfg, images_per_step)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.shards = {name: p.ds_tensor.detach().float().clone() for name, p in live.named_parameters()}
        self.shapes = {name: torch.Size(p.ds_shape) for name, p in live.named_parameters()}
        for p in self.module.parameters():
            p.data = torch.empty(0, device=p.device)

    def _blend(self, live: nn.Module, decay: float) -> None:
        for name, p in live.named_parameters():
            shard = self.shards[name]
            if decay == 0.0:
                shard.copy_(p.ds_tensor.detach())
            else:
                shard.lerp_(p.ds_tensor.detach().float(), 1.0 - decay)

    def _whole(self, name: str, shape: torch.Size, to_rank: int | None) -> torch.Tensor | None:
        """The parameter's whole average, gathered from the shards (on `to_rank` only, or on all)."""
        shard = self.shards[name]
        if to_rank is None:
            parts = [torch.empty_like(shard) for _ in range(self.world)]
            dist.all_gather(parts, shard)
        else:
            parts = [torch.empty_like(shard) for _ in range(self.world)] if self.rank == to_rank else None
            dist.gather(shard, parts, dst=to_rank)
            if self.rank != to_rank:
                return None
        return torch.cat(parts)[:shape.numel()].view(shape)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The whole average on every rank (a collective; see state_for_saving for rank 0 only)."""
        return self._gather(None)

    def state_for_saving(self, rank: int) -> Dict[str, torch.Tensor]:
        """Called on every rank: the whole average gathered to rank 0, {} elsewhere."""
        return self._gather(0)

    def _gather(self, to_rank: int | None) -> Dict[str, torch.Tensor]:
        out = {}
        for name, shape in self.shapes.items():
            whole = self._whole(name, shape, to_rank)
            if whole is not None:
                out[name] = whole
        if to_rank is None or self.rank == to_rank:
            # the persistent buffers, as the whole network's state_dict holds them
            out.update({k: v.detach().clone() for k, v in self.module.state_dict().items() if k not in self.shards})
        return out

    def load_state_dict(self, state: Dict[str, torch.Tensor], updates: int) -> None:
        """Restore this rank's shards (from a whole average, of any world size) and the count."""
        for name, shard in self.shards.items():
            flat = state[name].reshape(-1).to(shard.device, torch.float32)
            size = shard.numel()
            piece = flat[self.rank * size:(self.rank + 1) * size]
            shard.zero_()
            shard[:piece.numel()].copy_(piece)
        buffers = dict(self.module.named_buffers())
        for name, value in state.items():
            if name in buffers:
                buffers[name].copy_(value)
        self.updates = updates

    @contextmanager
    def full(self, to_rank: int | None = None) -> Iterator[nn.Module | None]:
        """The whole average in the shadow network while inside, on every rank or on `to_rank`
        only (None elsewhere: its shards are sent, nothing is held)."""
        params = dict(self.module.named_parameters())
        try:
            whole = self._gather(to_rank)  # {} on the ranks that only send
            for name in self.shapes.keys() & whole.keys():
                params[name].data = whole[name]
            yield self.module if whole else None
        finally:
            for p in params.values():
                p.data = torch.empty(0, device=p.device)

    def tensor_bytes(self) -> int:
        """Bytes this rank holds for the average: its shards and the buffers."""
        return sum(t.numel() * t.element_size() for t in self.shards.values()) + \
            sum(b.numel() * b.element_size() for b in self.module.buffers())
