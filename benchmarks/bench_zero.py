"""ZeRO on CPU ranks: per-rank memory of parameters / gradients / optimizer state for stages 0-3, and
the trainer's EMA bytes per rank at each stage (sharded under ZeRO-3), and the step-time overhead of
a DeepSpeed ZeRO-2 step over a plain torch loop.

    python benchmarks/bench_zero.py memory     # one 2-rank deepspeed launch per stage, per-rank tensor memory
    python benchmarks/bench_zero.py overhead                   # one process: engine vs plain loop

Memory is counted exactly: the bytes of every distinct tensor storage alive after one optimizer
step, split into the model's parameters and everything else (gradients, fp32 master copies,
Adam moments, communication buffers).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from model_zoo.registry import build_model  # noqa: E402
from trainer.config import DeepSpeedSection, EMAConfig, zero_section  # noqa: E402
from trainer.distributed import skip_cpu_shm_allreduce  # noqa: E402
from trainer.training.ema import EMA, ShardedEMA  # noqa: E402


def live_tensor_bytes(exclude: set) -> int:
    """Bytes of distinct live tensor storages (found through the garbage collector)."""
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not torch.is_tensor(obj) or obj.device.type == "meta":
                continue
            storage = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - exotic objects the GC hands out
            continue
        key = storage.data_ptr()
        if key in seen or key in exclude or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


BUCKET = int(5e6)


def ds_config(stage: int, micro: int, world: int) -> dict:
    """What the trainer generates for fp32 on CPU (torch's fused AdamW, its ZeRO defaults)."""
    zero = zero_section(DeepSpeedSection(zero_stage=stage, precision="fp32"), "cpu")
    # Buckets sized for a small model: DeepSpeed's 5e8-element defaults would add a 2 GB
    # fp32 buffer that hides the state being measured.
    zero.update(reduce_bucket_size=BUCKET, allgather_bucket_size=BUCKET, stage3_prefetch_bucket_size=BUCKET)
    return {"train_batch_size": micro * world, "train_micro_batch_size_per_gpu": micro,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True, "fused": True}},
            "zero_optimization": zero, "steps_per_print": 10**9}


class Net(torch.nn.Module):
    """A registry network with an MSE loss in forward (what the engine wraps)."""

    def __init__(self, name: str):
        super().__init__()
        self.net = build_model(name, num_classes=1000)

    def forward(self, x, t, y):
        return self.net(x, t, y).sample[:, :4].float().sub(x).square().mean()


def batch(micro: int, device="cpu"):
    return (torch.randn(micro, 4, 32, 32, device=device), torch.rand(micro, device=device),
            torch.randint(0, 1000, (micro,), device=device))


def memory_one(args) -> None:
    """Inside a deepspeed launch: one stage, print this rank's tensor bytes as a JSON line."""
    import json

    import deepspeed
    import torch.distributed as dist

    skip_cpu_shm_allreduce()  # as the trainer does: no leaked /dev/shm segments
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = ds_config(args.stage, args.micro, world)
    if args.stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            module = Net(args.model)
    else:
        module = Net(args.model)
    engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=cfg)
    x, t, y = batch(args.micro)
    inputs = {v.untyped_storage().data_ptr() for v in (x, t, y)}
    for _ in range(2):  # the first step creates the optimizer state lazily; measure the second
        loss = engine(x, t, y)
        engine.backward(loss)
        if _ == 0:
            engine.step()
    gc.collect()
    after_backward = live_tensor_bytes(inputs)
    engine.step()
    gc.collect()
    after_step = live_tensor_bytes(inputs)
    params = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
    # the trainer's EMA for this stage (ShardedEMA under ZeRO-3), after one update
    shadow = build_model(args.model, num_classes=1000)
    ema = ShardedEMA(shadow, EMAConfig(), args.micro * world, module.net) if args.stage == 3 else \
        EMA(shadow, EMAConfig(), args.micro * world)
    ema.copy_from(module.net)
    ema.update(module.net, args.micro * world)
    print("MEM " + json.dumps({"rank": rank, "world": world, "params": params, "backward": after_backward,
                               "step": after_step, "ema": ema.tensor_bytes()}), flush=True)
    engine.destroy()
    dist.destroy_process_group()


def memory(args) -> None:
    """Launch one 2-rank deepspeed job per ZeRO stage and tabulate what each rank holds."""
    import json
    import socket
    import subprocess

    rows = {}
    for stage in (0, 1, 2, 3):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks), "--master_port",
               str(port), os.path.abspath(__file__), "memory-one", "--stage", str(stage), "--model", args.model,
               "--micro", str(args.micro)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        found = [json.loads(line.split("MEM ", 1)[1]) for line in out.stdout.splitlines() if "MEM {" in line]
        if len(found) != args.ranks:
            sys.exit(f"stage {stage} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        rows[stage] = sorted(found, key=lambda r: r["rank"])
    first = rows[0][0]
    print(f"model {args.model}, {first['params'] / 1e6:.1f}M parameters, fp32 weights, {args.ranks} CPU ranks, "
          f"micro-batch {args.micro}; MiB of live tensors per rank (max over ranks)")
    print("| ZeRO stage | after backward, step 2 (weights + grads + optimizer) | after step "
          "| vs stage 0 (after backward) | EMA (fp32) | EMA vs stage 0 |")
    print("|---|---|---|---|---|---|")
    base, ema_base = max(r["backward"] for r in rows[0]), max(r["ema"] for r in rows[0])
    for stage, ranks in rows.items():
        bw, st, ema = (max(r[k] for r in ranks) for k in ("backward", "step", "ema"))
        print(f"| {stage} | {bw / 2**20:.1f} | {st / 2**20:.1f} | {bw / base:.2f}x | {ema / 2**20:.1f} "
              f"| {ema / ema_base:.2f}x |")


def overhead(args) -> None:
    import deepspeed

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29731"))
    skip_cpu_shm_allreduce()  # as the trainer does: no leaked /dev/shm segments
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    plain = Net(args.model)
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-4, fused=True)  # the same kernel the engine runs
    torch.manual_seed(0)
    wrapped = Net(args.model)
    engine, *_ = deepspeed.initialize(model=wrapped, model_parameters=wrapped.parameters(),
                                      config=ds_config(2, args.micro, 1))
    x, t, y = batch(args.micro)

    def plain_step():
        loss = plain(x, t, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def ds_step():
        loss = engine(x, t, y)
        engine.backward(loss)
        engine.step()

    times = {"plain torch": [], "DeepSpeed ZeRO-2": []}
    for fn in (plain_step, ds_step):
        fn()
    for _ in range(args.rounds):
        for name, fn in (("plain torch", plain_step), ("DeepSpeed ZeRO-2", ds_step)):
            start = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[name].append((time.perf_counter() - start) / args.steps)
    print(f"model {args.model}, fp32, 1 process, {torch.get_num_threads()} threads, micro-batch {args.micro}, "
          f"{args.rounds} interleaved rounds x {args.steps} steps")
    print("| loop | step ms (median) | overhead (median of per-round ratios) |")
    print("|---|---|---|")
    for name, ts in times.items():
        # Paired per round: this VM's speed drifts by +-10% over a minute, a round's two loops alike.
        ratio = statistics.median(a / b for a, b in zip(ts, times["plain torch"]))
        print(f"| {name} | {statistics.median(ts) * 1e3:.1f} | {ratio - 1:+.1%} |")
    engine.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["memory", "overhead", "memory-one"])
    parser.add_argument("--stage", type=int, default=2, help="memory-one: the ZeRO stage")
    parser.add_argument("--ranks", type=int, default=2, help="memory: ranks per launch")
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    {"memory": memory, "memory-one": memory_one, "overhead": overhead}[args.mode](args)


if __name__ == "__main__":
    main()
