"""The one module that touches DeepSpeed's process group and engine set-up.

Device-agnostic through DeepSpeed's accelerator: CPU + gloo here, CUDA + NCCL on clusters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed() -> DistInfo:
    """Start (or join) the process group the launcher set up through RANK / WORLD_SIZE / MASTER_*."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if acc.device_name() != "cpu":
        acc.set_device(local_rank)
    if "RANK" not in os.environ:  # plain `python -m trainer.cli`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if acc.device_name() == "cpu":
        skip_cpu_shm_allreduce()
    deepspeed.init_distributed(dist_backend=acc.communication_backend_name())
    device = torch.device(acc.device_name(local_rank)) if acc.device_name() != "cpu" else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


SHM_OP = "deepspeed_shm_comm"


def skip_cpu_shm_allreduce() -> None:
    """Keep DeepSpeed's CPU shared-memory all-reduce op out of the process group set-up.

    On the CPU accelerator, DeepSpeed JIT-compiles that op in every rank at start-up and maps one
    ~66 MiB /dev/shm segment per rank that it never unlinks: every run leaks them until /dev/shm
    (RAM) is full, and a rank killed while compiling leaves a lock that makes every later start
    wait forever. The op only serves tensor-parallel inference all-reduce, which the trainer never
    calls; gradients go through torch.distributed (gloo) either way.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_OP] = False  # the dict is probed lazily on first access


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size_from_env() -> int:
    """World size the launcher announced (for validation before the process group starts)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_engine(build_module: Callable[[], torch.nn.Module], ds_config: Dict[str, Any], rank: int,
                 compile_model: bool = False):
    """Build the module (under zero.Init for ZeRO-3) and wrap it in a DeepSpeed engine.

    Under zero.Init every parameter is partitioned as soon as its module is built, so the model's
    own initialisation ran on empty shards: it is re-applied on rank 0 with the parameters
    gathered, and DeepSpeed scatters the result.
    """
    import deepspeed

    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            module = build_module()
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
            if rank == 0:
                module.net.initialize_weights()
    else:
        module = build_module()
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=list(module.parameters()),
                                           config=ds_config)
    if compile_model:
        engine.compile()
    return engine


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_rank(flag: torch.Tensor) -> bool:
    """True when flag (a 0-dim tensor) is non-zero on any rank; one tiny all-reduce."""
    flag = flag.float().reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def shutdown(engine=None) -> None:
    """Release the engine and the process group; safe to call more than once."""
    if engine is not None:
        try:
            engine.destroy()
        except Exception:  # noqa: BLE001 - teardown must not mask the run's own error
            pass
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_step(seed: int, rank: int, step: int, micro: int) -> None:
    """Seed every RNG for one micro-step from (seed, rank, step, micro): resumed runs draw the same
    noise, sigmas, masks and label drops as uninterrupted ones, without saving RNG states."""
    import random

    import numpy as np
    from deepspeed.accelerator import get_accelerator

    value = int(np.random.SeedSequence([seed, rank, step, micro]).generate_state(1)[0])
    torch.manual_seed(value)
    random.seed(value)
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        acc.manual_seed(value)


@contextmanager
def gathered(params: List[torch.nn.Parameter]) -> Iterator[None]:
    """Make ZeRO-3 partitioned parameters whole for reading (a no-op for other stages)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

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
