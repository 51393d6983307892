"""Training-step throughput and MFU of registry models on this machine (forward + loss + backward + AdamW).

Prints, for each model: step time, images/s, model FLOPs per step (counted by model_zoo.flops),
achieved TFLOP/s and MFU against the bf16 matmul peak measured in the same run, and the speed-up
of every model over the first one. Models are timed in interleaved rounds so that drift in the
machine's speed hits all of them alike.

    python benchmarks/bench_train_step.py --models DiT-S/2 MaskDiT-S/2 --batch 8
    python benchmarks/bench_train_step.py --models DiT-XL/2 MaskDiT-XL/2 --batch 256 --fit-batch --compile both

The device is torch's current accelerator when there is one (else the CPU), found through
torch.accelerator: no device type is named here. --fit-batch halves a model's batch until a step
fits in the accelerator's memory.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections import Counter
from contextlib import nullcontext

import torch
import torch._dynamo
from torch.utils._python_dispatch import TorchDispatchMode

from model_zoo.flops import model_flops
from model_zoo.registry import build_model


def pick_device(name: str = "auto") -> torch.device:
    """torch's current accelerator (cuda, xpu, mps, ...) when there is one, else the CPU. Not
    trainer.distributed.accelerator_device: that goes through DeepSpeed, which the GPU machines
    this benchmark is meant for may lack (it needs torch alone)."""
    if name != "auto":
        return torch.device(name)
    return torch.accelerator.current_accelerator() if torch.accelerator.is_available() else torch.device("cpu")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings on an accelerator are asynchronous)."""
    if device.type != "cpu":
        torch.accelerator.synchronize()


def matmul_peak(dtype: torch.dtype, size: int = 4096, repeats: int = 8, device: torch.device = torch.device("cpu")
                ) -> float:
    """Best observed FLOP/s of a square matmul: the practical peak MFU is measured against."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
             torch.ops.aten.baddbmm.default}


class _MatmulRecorder(TorchDispatchMode):
    """Records every matmul of a step as (op, (shape, stride, dtype) per tensor argument)."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _MATMULS:
            spec = tuple((tuple(a.shape), tuple(a.stride()), a.dtype) if isinstance(a, torch.Tensor) else a
                         for a in args)
            self.calls[(func, spec)] += 1
        return func(*args, **(kwargs or {}))


def matmul_floor(calls: Counter, repeats: int = 3, device: torch.device = torch.device("cpu")) -> float:
    """Seconds the step's matmuls take when run alone with the same shapes, strides and dtypes.

    Nothing else in the step is free, so flops / (this time) bounds the MFU the step can reach.
    """
    total = 0.0
    for (func, spec), count in calls.items():
        args = [torch.empty_strided(a[0], a[1], dtype=a[2], device=device).normal_() if isinstance(a, tuple) else a
                for a in spec]
        func(*args)
        best = float("inf")
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            func(*args)
            sync(device)
            best = min(best, time.perf_counter() - start)
        total += best * count
    return total


class StepRunner:
    """One model, its optimiser and a fixed batch; step() runs one full training step."""

    def __init__(self, name: str, batch: int, input_size: int, mask_ratio: float, dtype: torch.dtype,
                 compile_model: bool = False, device: torch.device = torch.device("cpu"), skip: bool = False):
        self.base_name = name
        self.name = name + (" skip" if skip else "") + (" compiled" if compile_model else "")
        self.device, self.batch = device, batch
        self.model = build_model(name, input_size=input_size, num_classes=1000, skip=skip).to(device)
        self.mask_ratio = mask_ratio if name.startswith("MaskDiT") else 0.0
        # fused: one kernel over all parameters (the trainer's torch_adam path uses it too)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
        c = self.model.in_channels
        self.x = torch.randn(batch, c, input_size, input_size, device=device)
        self.t = torch.rand(batch, device=device)
        self.y = torch.randint(0, 1000, (batch,), device=device)
        self.autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        # counted on the meta device at batch 1 (FLOPs scale with the batch): no memory, no gradients
        self.flops = model_flops(name, 1, self.mask_ratio, backward=True, input_size=input_size, num_classes=1000,
                                 skip=skip) * batch
        # Inductor fuses the elementwise tails (GELU, modulation, LayerNorm casts) into C++ loops;
        # static shapes: a retry at half the batch must not turn the batch dimension dynamic.
        self.forward = torch.compile(self.model, dynamic=False) if compile_model else self.model
        self.times: list[float] = []

    def step(self) -> None:
        """Forward, MSE loss against the clean latent, backward, optimiser step."""
        with self.autocast:
            out = self.forward(self.x, self.t, self.y, mask_ratio=self.mask_ratio).sample
        loss = (out[:, : self.x.shape[1]].float() - self.x).square().mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def matmul_floor(self) -> float:
        """Standalone time of this step's matmuls (see matmul_floor)."""
        recorder, compiled = _MatmulRecorder(), self.forward
        self.forward = self.model  # the eager step issues the same matmuls; no recompile under the mode
        try:
            with recorder:
                self.step()
        finally:
            self.forward = compiled
        return matmul_floor(recorder.calls, device=self.device)

    def timed(self, steps: int) -> None:
        """Time `steps` steps and record the mean step time of this round."""
        sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        self.times.append((time.perf_counter() - start) / steps)


def fitted_runner(name: str, batch: int, fit: bool, **kwargs) -> StepRunner:
    """A runner at `batch`, or (fit) at the largest of batch, batch/2, ... whose step (with its
    compile) fits in the device's memory."""
    while True:
        try:
            runner = StepRunner(name, batch, **kwargs)
            runner.timed(2)  # warm-up: allocator, kernel selection, compile
            runner.times.clear()
            return runner
        except torch.OutOfMemoryError:
            if not fit or batch == 1:
                raise
        # out of the handler, whose traceback held the failed step's tensors
        runner = None
        torch._dynamo.reset()
        gc.collect()
        if torch.accelerator.is_available():
            torch.accelerator.empty_cache()
        batch //= 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["DiT-S/2", "MaskDiT-S/2"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256px)")
    parser.add_argument("--mask-ratio", type=float, default=0.5)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="auto", help="auto: torch's current accelerator, else cpu")
    parser.add_argument("--fit-batch", action="store_true", help="halve a model's batch until its step fits")
    parser.add_argument("--skip", action="store_true", help="build the models with Skip-DiT skip branches")
    parser.add_argument("--compile", choices=["no", "yes", "both"], default="no",
                        help="torch.compile the models (both: eager and compiled side by side)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    device = pick_device(args.device)
    peak = matmul_peak(dtype, device=device)
    modes = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    runners = [fitted_runner(n, args.batch, args.fit_batch, input_size=args.input_size, mask_ratio=args.mask_ratio,
                             dtype=dtype, compile_model=c, device=device, skip=args.skip)
               for c in modes for n in args.models]
    floors: dict = {}
    for _ in range(args.rounds):
        for r in runners:
            r.timed(args.steps)
        # This VM's speed drifts (shared host): sample the peak and the matmul floors in every
        # round and keep the best of each, like the step times' median.
        peak = max(peak, matmul_peak(dtype, repeats=3, device=device))
        # eager and compiled issue the same matmuls at the same batch
        for key, r in {(r.base_name, r.batch): r for r in runners}.items():
            floors[key] = min(floors.get(key, float("inf")), r.matmul_floor())

    print(f"device={device} threads={args.threads} dtype={args.dtype} latent=4x{args.input_size}x{args.input_size} "
          f"mask_ratio={args.mask_ratio} rounds={args.rounds}x{args.steps} steps")
    print(f"measured {args.dtype} matmul peak: {peak / 1e12:.3f} TFLOP/s")
    header = (f"| {'model':<23} | batch | step ms (median) | img/s | GFLOP/step | TFLOP/s | MFU "
              f"| img/s vs {runners[0].name} "
              f"| matmul-only ms | MFU ceiling |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    base = runners[0].batch / statistics.median(runners[0].times)  # images/s: batches may differ (--fit-batch)
    for r in runners:
        t = statistics.median(r.times)
        achieved = r.flops / t
        label = r.name + (f" r={r.mask_ratio}" if r.mask_ratio else "")
        print(f"| {label:<23} | {r.batch:5d} | {t * 1e3:16.1f} | {r.batch / t:5.1f} | {r.flops / 1e9:10.1f} | "
              f"{achieved / 1e12:7.3f} | {achieved / peak:4.0%} | {r.batch / t / base:.2f}x "
              f"| {floors[r.base_name, r.batch] * 1e3:14.1f} | {r.flops / floors[r.base_name, r.batch] / peak:11.0%} |")
    print("matmul-only: the step's matmuls (same shapes, strides, dtypes) run alone; MFU ceiling: the MFU "
          "if everything else in the step took no time")


if __name__ == "__main__":
    main()
