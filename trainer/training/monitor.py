"""Training metrics: accumulated on the device every step, reduced across ranks and written only on
log steps (TensorBoard scalars, loss by noise level, a rank-0 progress line with ETA, MFU).
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable, Dict

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from torch.utils.tensorboard import SummaryWriter

from ..config import MonitorConfig
from ..console import say
from ..diffusion import LossOutput
from ..progress import format_eta
from .run_control import StepEnd

try:
    import resource  # POSIX only: the CPU memory figure
except ImportError:  # pragma: no cover - Windows
    resource = None

# Edges of the log-sigma buckets for "loss by noise level" (EDM's training range is ~0.002..80).
SIGMA_EDGES = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)


def bucket_names() -> list:
    """Human-readable bucket labels matching SIGMA_EDGES."""
    edges = ("0",) + tuple(f"{e:g}" for e in SIGMA_EDGES) + ("inf",)
    return [f"{lo}-{hi}" for lo, hi in zip(edges, edges[1:])]


class Monitor:
    """Collects per-step losses without host syncs; `log()` reduces and writes them."""

    def __init__(self, cfg: MonitorConfig, run_dir: str, rank: int, total_steps: int, device: torch.device,
                 peak_flops: float, writer=None, clock: Callable[[], float] = time.perf_counter):
        self.cfg = cfg
        self._clock = clock
        self.rank = rank
        self.total_steps = total_steps
        self.device = device
        self.peak_flops = peak_flops
        self.writer = writer
        if writer is None and rank == 0 and cfg.tensorboard:
            self.writer = SummaryWriter(os.path.join(run_dir, "tb"))
        self._edges = torch.tensor(SIGMA_EDGES, device=device)
        self._skipped = 0
        self._reset()
        self._window_start = self._clock()

    def _reset(self) -> None:
        n = len(SIGMA_EDGES) + 1
        # [loss, dsm, mae, samples] sums and per-bucket [sum, count]; one tensor -> one all_reduce.
        # [loss, dsm, mae, count, loss per sigma bucket (n), count per bucket (n), align]
        self._sums = torch.zeros(5 + 2 * n, device=self.device, dtype=torch.float64)
        self._step_sums = torch.zeros_like(self._sums)  # the current step's, until it is applied
        self._data_wait = 0.0
        self._steps = 0
        self._flops = 0.0
        self._images = 0

    def drop_window(self) -> None:
        """Forget what was collected since the last log (a rollback: those steps are trained again)."""
        self._reset()
        self._window_start = self._clock()

    def due(self, end: StepEnd) -> bool:
        """Whether the step just finished is a log step: every monitor.log_every, and the last."""
        return end.step % self.cfg.log_every == 0 or end.last

    def record(self, out: LossOutput) -> None:
        """Add one micro-batch's per-sample losses to the current step's (stays on the device)."""
        n = len(SIGMA_EDGES) + 1
        loss = out.loss.detach().double()
        idx = torch.bucketize(out.sigma.detach(), self._edges)
        per_bucket = torch.zeros(n, device=self.device, dtype=torch.float64).index_add_(0, idx, loss)
        # not torch.bincount: on CUDA it reads the largest index back to the host to size its output
        counts = torch.zeros(n, device=self.device, dtype=torch.float64).index_add_(0, idx, torch.ones_like(loss))
        # new_full fills on the device; torch.tensor(x, device=...) would copy from the host and wait
        head = torch.stack([loss.sum(), out.dsm.detach().double().sum(), out.mae.detach().double().sum(),
                            loss.new_full((), float(loss.numel()))])
        align = out.align.detach().double().sum() if out.align is not None else loss.new_zeros(())
        self._step_sums += torch.cat([head, per_bucket, counts, align.reshape(1)])

    def drop_step(self) -> None:
        """Forget the current step's losses: its update was skipped (non-finite gradients) and the
        step is tried again with new data."""
        self._step_sums.zero_()

    def step_done(self, images: int, flops: float, data_wait: float, skipped_samples: int = 0) -> None:
        """Count a finished optimizer step: its recorded losses join the window (on the device), and
        the host-side numbers; skipped_samples: this rank's running count of bad samples its data stream
        left out."""
        self._sums += self._step_sums
        self._step_sums.zero_()
        self._skipped = skipped_samples
        self._steps += 1
        self._images += images
        self._flops += flops
        self._data_wait += data_wait

    def log(self, step: int, scalars: Dict[str, float], world_size: int, phase: str = "") -> Dict[str, float]:
        """Reduce across ranks, write TensorBoard, print the progress line; returns the metrics."""
        # Every rank's skip count rides in the same all-reduce: a bad shard read by rank 1 counts too.
        sums = torch.cat([self._sums, torch.tensor([float(self._skipped)], device=self.device, dtype=torch.float64)])
        if world_size > 1:
            dist.all_reduce(sums)
        sums = sums.cpu().tolist()
        n = len(SIGMA_EDGES) + 1
        count = max(sums[3], 1.0)
        elapsed = max(self._clock() - self._window_start, 1e-9)
        metrics = {"loss": sums[0] / count, "loss_dsm": sums[1] / count, "loss_mae": sums[2] / count,
                   "loss_align": sums[4 + 2 * n] / count, "skipped_samples": sums[5 + 2 * n],
                   "images_per_s": self._images * world_size / elapsed,
                   "data_wait_share": self._data_wait / elapsed,
                   "mfu": self._flops / elapsed / self.peak_flops if self.peak_flops else 0.0}
        metrics.update(scalars)
        metrics.update(_memory_metrics())
        if self.rank == 0:
            if self.writer is not None:
                for key, value in metrics.items():
                    self.writer.add_scalar(f"train/{key}", value, step)
                for name, total, cnt in zip(bucket_names(), sums[4:4 + n], sums[4 + n:4 + 2 * n]):
                    self.writer.add_scalar(f"samples_by_sigma/{name}", cnt, step)
                    if cnt:
                        self.writer.add_scalar(f"loss_by_sigma/{name}", total / cnt, step)
                self.writer.flush()
            self._progress_line(step, metrics, elapsed, phase)
        self._reset()
        self._window_start = self._clock()
        return metrics

    def _progress_line(self, step: int, m: Dict[str, float], elapsed: float, phase: str) -> None:
        rate = elapsed / max(1, self._steps)
        eta = format_eta((self.total_steps - step) * rate)
        align = f" align {m['loss_align']:.3f}" if m.get("loss_align") else ""
        line = (f"step {step}/{self.total_steps} | {phase} r={m.get('mask_ratio', 0):.2f} | "
                f"loss {m['loss']:.4f} (dsm {m['loss_dsm']:.4f} mae {m['loss_mae']:.4f}{align}) | "
                f"lr {m.get('lr', 0):.2e} | gnorm {m.get('grad_norm', float('nan')):.3f} | "
                f"{m['images_per_s']:.1f} img/s | MFU {m['mfu']:.1%} | data {m['data_wait_share']:.0%} | "
                f"ETA {eta}")
        say(line)

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Log one scalar to TensorBoard (rank 0), e.g. an evaluation's result."""
        if self.rank == 0 and self.writer is not None:
            self.writer.add_scalar(tag, value, step)
            self.writer.flush()

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        """Log a [3, H, W] image in [0, 1] to TensorBoard (rank 0)."""
        if self.rank == 0 and self.writer is not None:
            self.writer.add_image(tag, grid, step)
            self.writer.flush()

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """Log text (resolved config, phase plan) to TensorBoard (rank 0)."""
        if self.rank == 0 and self.writer is not None:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _memory_metrics() -> Dict[str, float]:
    """Accelerator memory in use / peak (GiB), or the process's resident memory on CPU."""
    acc = get_accelerator()
    if acc.device_name() == "cpu":
        if resource is None:
            return {}
        return {"max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    return {"mem_alloc_gib": acc.memory_allocated() / 2**30, "mem_peak_gib": acc.max_memory_allocated() / 2**30}


def measure_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 2048) -> float:
    """A quick estimate of the accelerator's matmul peak (FLOP/s) for MFU when none is configured."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ a
    get_accelerator().synchronize()
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        a @ a
        get_accelerator().synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
