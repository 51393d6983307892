"""The DeepSpeed engine of a training run: its JSON config on this accelerator, building it (under
zero.Init for ZeRO-3), per-step seeding, and the helpers that read ZeRO-3 partitioned weights
(gathered one top-level child at a time: replica checksums, the EMA)."""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Tuple

import deepspeed
import numpy as np
import torch
import torch._dynamo
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from ..config import TrainConfig, to_deepspeed_json
from ..distributed import accelerator_name


def deepspeed_config(cfg: TrainConfig, world_size: int) -> Dict[str, Any]:
    """DeepSpeed's JSON for this launch config, world size and this process's accelerator."""
    return to_deepspeed_json(cfg, world_size, accelerator_name())


COMPILE_CACHE_LIMIT = 16
"""The least recompile limit given to torch.compile for the network: dynamo runs a frame eagerly
once it has been compiled more often than its limit (8 by default), which a schedule's levels plus
unmask tuning can reach (the trainer raises it further for more levels)."""


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far (a host-side counter, no sync)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def build_engine(build_module: Callable[[], torch.nn.Module], ds_config: Dict[str, Any], rank: int,
                 compile_model: bool = False, compile_backend: str = "inductor",
                 token_counts: int = 2,
                 init_weights: Callable[[torch.nn.Module], None] | None = None) -> deepspeed.DeepSpeedEngine:
    """Build the module (under zero.Init for ZeRO-3) and wrap it in a DeepSpeed engine.

    With compile_model the engine is compiled with `compile_backend`, allowing at least
    `token_counts` graphs. Under zero.Init every parameter is partitioned as soon as its module is
    built, so the model's own initialisation ran on empty shards: it is re-applied on rank 0 with
    the parameters gathered, and DeepSpeed scatters the result. `init_weights(net)` then sets
    weights of the network (model.init_from) the same way: whole, before partitioning.
    """
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            module = build_module()
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
            if rank == 0:
                module.net.initialize_weights()
                if init_weights is not None:
                    init_weights(module.net)
    else:
        module = build_module()
        if init_weights is not None:  # every rank alike (not left to DeepSpeed's broadcast from rank 0)
            init_weights(module.net)
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=list(module.parameters()),
                                           config=ds_config)
    if compile_model:
        # token_counts: how many kept-token counts the plan can meet (each one graph)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_CACHE_LIMIT,
                                                   token_counts + 4)
        engine.compile(backend=compile_backend)
    if not hasattr(engine.optimizer, "overflow"):
        skip_nonfinite_updates(engine.optimizer)
    return engine


def skip_nonfinite_updates(optimizer: torch.optim.Optimizer) -> None:
    """Make a plain optimizer skip an update whose gradients are not all finite, and say so the way
    DeepSpeed's own optimizers do (`optimizer.overflow`, which the engine counts in skipped_steps).

    DeepSpeed's ZeRO-1/2/3 and bf16/fp16 optimizers already skip such updates; only the plain
    optimizer of ZeRO-0 fp32 applies them (one NaN then ruins every weight). The check costs one
    fused norm over the gradients and one host read per optimizer step, the same as DeepSpeed's.
    The gradients are all-reduced by then, so every rank decides alike.
    """
    step = optimizer.step
    optimizer.overflow = False

    def guarded_step(*args, **kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        optimizer.overflow = bool(grads) and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        if not optimizer.overflow:
            return step(*args, **kwargs)
        return None

    optimizer.step = guarded_step


def loss_scale(engine: deepspeed.DeepSpeedEngine) -> float | None:
    """The engine's current fp16 loss scale (a host number), None when its optimizer has none."""
    opt = engine.optimizer
    for holder in (opt, getattr(opt, "loss_scale_config", None), getattr(opt, "loss_scaler", None)):
        value = getattr(holder, "cur_scale", None)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def seed_step(seed: int, rank: int, step: int, micro: int, rollbacks: int = 0) -> None:
    """Seed every RNG for one micro-step from (seed, rank, step, micro): resumed runs draw the same
    noise, sigmas, masks and label drops as uninterrupted ones, without saving RNG states. After a
    rollback the steps it repeats draw afresh (`rollbacks` joins the seed)."""
    entropy = [seed, rank, step, micro] + ([rollbacks] if rollbacks else [])
    value = int(np.random.SeedSequence(entropy).generate_state(1)[0])
    torch.manual_seed(value)
    random.seed(value)
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        acc.manual_seed(value)


@contextmanager
def gathered(params: List[torch.nn.Parameter]) -> Iterator[None]:
    """Make ZeRO-3 partitioned parameters whole for reading (a no-op for other stages)."""
    if any(hasattr(p, "ds_id") for p in params):
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def parameter_chunks(module: torch.nn.Module) -> Iterator[List[Tuple[str, torch.nn.Parameter]]]:
    """Named parameters in pieces small enough to gather one at a time: the module's own
    parameters, then each top-level child's."""
    own = list(module.named_parameters(recurse=False))
    if own:
        yield own
    for name, child in module.named_children():
        params = list(child.named_parameters(prefix=name))
        if params:
            yield params


@torch.no_grad()
def replica_checksums(module: torch.nn.Module) -> List[List[float]]:
    """[sum, sum of squares] of all weights, per rank (gathered under ZeRO-3).

    Data-parallel replicas must hold identical weights; a mismatch means silent divergence.
    """
    device = next(module.parameters()).device
    local = torch.zeros(2, dtype=torch.float64, device=device)
    for params in parameter_chunks(module):
        with gathered([p for _, p in params]):
            for _, p in params:
                v = p.detach().double()
                local += torch.stack([v.sum(), v.square().sum()])
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [local.tolist()]
    out = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return [t.tolist() for t in out]
