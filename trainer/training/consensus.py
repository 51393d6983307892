"""Host-side flags every rank must agree on each step (stop requested, time limit reached), agreed
without touching the accelerator: a max all-reduce over a gloo process group of its own, started
when the step starts and read when it ends, so it runs while the step computes and the step never
waits for it (on CUDA an all-reduce over NCCL would need a device tensor and a device-to-host read,
which drains the stream)."""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist


def host_group(world_size: int):
    """A gloo process group over every rank for host-side flags (None in a world of one). Every
    rank must call this at the same point (it is a collective)."""
    if world_size <= 1:
        return None
    return dist.new_group(backend="gloo")


class HostVote:
    """Flags cast by every rank at the start of a step and agreed (the max over ranks) at its end.

    `cast(values)` starts the all-reduce; `result()` waits for it and returns the agreed values.
    Each rank must cast and read the same number of times in the same order.
    """

    def __init__(self, group, size: int):
        self.group, self.size = group, size
        self._pending: tuple | None = None

    def cast(self, values: List[float]) -> None:
        """Start agreeing on this step's flags (one value per flag, 0 or 1 for yes/no)."""
        if len(values) != self.size:
            raise ValueError(f"HostVote expects {self.size} values, got {len(values)}")
        flags = torch.tensor(values, dtype=torch.float32)  # CPU: gloo's side of the job
        work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group, async_op=True) \
            if self.group is not None else None
        self._pending = (flags, work)

    def result(self) -> List[float]:
        """The agreed flags of the last cast (waits for the other ranks' votes)."""
        if self._pending is None:
            raise RuntimeError("HostVote.result() without a cast")
        flags, work = self._pending
        self._pending = None
        if work is not None:
            work.wait()
        return flags.tolist()
