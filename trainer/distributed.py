"""The one module that starts and ends the process group, and says which device this process uses.

Device-agnostic through DeepSpeed's accelerator: CPU + gloo here, CUDA + NCCL on clusters. Training,
sampling and evaluation share it; the training engine's own set-up is trainer.training.engine.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import deepspeed
import deepspeed.ops
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def accelerator_device(local_rank: int = 0) -> torch.device:
    """This process's device from DeepSpeed's accelerator: 'cpu', or the local rank's 'cuda:N' (or
    whatever the accelerator names it); the code never spells a device type itself."""
    acc = get_accelerator()
    return torch.device("cpu") if acc.device_name() == "cpu" else torch.device(acc.device_name(local_rank))


def accelerator_name() -> str:
    """The accelerator's device type: 'cpu', 'cuda', ..."""
    return get_accelerator().device_name()


def precision_problem(precision: str) -> str | None:
    """Why this accelerator cannot train in `precision` ('bf16', 'fp16', 'fp32'), in one line
    naming the key and what to use instead; None when it can (as DeepSpeed's accelerator says)."""
    acc = get_accelerator()
    supported = {"bf16": acc.is_bf16_supported, "fp16": acc.is_fp16_supported}.get(precision)
    if supported is None or supported():
        return None
    others = [p for p, ok in (("bf16", acc.is_bf16_supported()), ("fp32", True)) if ok and p != precision]
    return (f"deepspeed.precision: {precision} is not supported on this accelerator ({acc.device_name()}); use "
            f"{' or '.join(others)}")


def init_distributed() -> DistInfo:
    """Start (or join) the process group the launcher set up through RANK / WORLD_SIZE / MASTER_*."""
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
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, accelerator_device(local_rank))


SHM_OP = "deepspeed_shm_comm"


def skip_cpu_shm_allreduce() -> None:
    """Keep DeepSpeed's CPU shared-memory all-reduce op out of the process group set-up.

    On the CPU accelerator, DeepSpeed JIT-compiles that op in every rank at start-up and maps one
    ~66 MiB /dev/shm segment per rank that it never unlinks: every run leaks them until /dev/shm
    (RAM) is full, and a rank killed while compiling leaves a lock that makes every later start
    wait forever. The op only serves tensor-parallel inference all-reduce, which the trainer never
    calls; gradients go through torch.distributed (gloo) either way.
    """
    deepspeed.ops.__compatible_ops__[SHM_OP] = False  # the dict is probed lazily on first access


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env() -> DistInfo:
    """Rank, world size and local rank the launcher announced (RANK / WORLD_SIZE / LOCAL_RANK; a
    world of one without a launcher), and the local rank's device, before any process group exists
    (for validation and one-line errors before start-up)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), local_rank,
                    accelerator_device(local_rank))


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Release the process group; safe to call more than once."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
