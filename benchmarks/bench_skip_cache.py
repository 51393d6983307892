"""Skip-Cache sampling speed and fidelity: cache interval N = 2 and 3 against no cache.

A small skip-branch network (default: DiT-S/2 narrowed to width 192, latent 4 x 16 x 16) is first
trained briefly on synthetic class-structured latents so that its blocks do real work (an untrained
DiT is the identity with a zero output, and any cache would look free), then sampled with
250 ancestral DDPM steps (linear schedule, respaced) and 50 EDM Heun steps, each without cache and
with Skip-Cache N = 2, 3 (settings interleaved, best of --repeats). Prints evaluations, blocks
run, wall and process-CPU time, speedup over no cache and the relative L2 difference of the final
latents to the uncached run (same noise, same seeds).

    .venv/bin/python benchmarks/bench_skip_cache.py --threads 1   # a few minutes on an idle core

Wall times on a shared machine are disturbed by other load: compare rows of one run only, and
prefer the CPU-time column with --threads 1 there.
"""

from __future__ import annotations

import argparse
import time
from typing import List

import torch

from model_zoo.registry import build_model
from trainer.diffusion import (
    DDPMSchedule,
    Denoiser,
    LogNormalSigma,
    LossWeighting,
    SkipCacheConfig,
    ddpm_sigmas,
    karras_sigmas,
    make_preconditioning,
    sample,
    training_losses,
)


def synthetic_latents(n: int, num_classes: int, channels: int, size: int, g: torch.Generator):
    """Class-structured latents: a fixed smooth random pattern per class plus small noise."""
    base = torch.randn(num_classes, channels, 4, 4, generator=torch.Generator().manual_seed(1234))
    base = torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return base[y] * 0.5 + 0.1 * torch.randn(n, channels, size, size, generator=g), y


def train_briefly(den: Denoiser, steps: int, batch: int, num_classes: int, g: torch.Generator) -> float | None:
    """A few AdamW steps of the MaskDiT objective at mask ratio 0; returns the last loss."""
    if steps == 0:  # randomise instead, so the network is not the identity
        with torch.no_grad():
            for p in den.net.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        return None
    net = den.net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-4)
    loss = torch.zeros(())
    for _ in range(steps):
        x0, y = synthetic_latents(batch, num_classes, net.in_channels, net.input_size, g)
        loss = training_losses(den, x0, y, 0.0, LossWeighting("min_snr"), LogNormalSigma(), generator=g).loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    return float(loss.detach())


def timed(den: Denoiser, noise, y, sampler: str, sigmas, cfg_scale: float, cache: SkipCacheConfig | None):
    """(wall s, process CPU s) of one sampling run and its result (fixed seeds: repeats are identical).

    CPU time is reported too because it is far less disturbed than wall time by other jobs on a
    shared machine (with --threads 1 it is the honest cost; with more threads it includes spinning).
    """
    start, start_cpu = time.perf_counter(), time.process_time()
    result = sample(den, noise, y, sigmas, sampler=sampler, guidance_scale=cfg_scale, skip_cache=cache,
                    generator=torch.Generator().manual_seed(7))
    return (time.perf_counter() - start, time.process_time() - start_cpu), result


def main(argv: List[str] | None = None) -> None:
    """Parse arguments, train briefly, sample with each setting and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="DiT-S/2", help="registry name (built with skip=True)")
    ap.add_argument("--hidden-size", type=int, default=192)
    ap.add_argument("--num-heads", type=int, default=3)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--input-size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--cfg", type=float, default=1.5, help="guidance scale (cond + uncond in one batch)")
    ap.add_argument("--n-keep", type=int, default=1, help="blocks kept at each end on cached steps")
    ap.add_argument("--intervals", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--ddpm-steps", type=int, default=250)
    ap.add_argument("--heun-steps", type=int, default=50)
    ap.add_argument("--train-steps", type=int, default=100, help="0: randomised weights instead")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats; the best time counts")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    num_classes = 10
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = build_model(args.model, input_size=args.input_size, in_channels=4, num_classes=num_classes,
                      hidden_size=args.hidden_size, depth=args.depth, num_heads=args.num_heads, skip=True)
    den = Denoiser(net, make_preconditioning("edm"))
    last = train_briefly(den, args.train_steps, 16, num_classes, g)
    params = sum(p.numel() for p in net.parameters())
    print(f"# {args.model} width {args.hidden_size} depth {args.depth}, {params / 1e6:.1f}M params, latent "
          f"4x{args.input_size}x{args.input_size}, batch {args.batch}, cfg {args.cfg}, n_keep {args.n_keep}, "
          f"trained {args.train_steps} steps (last loss {last if last is None else round(last, 4)}), "
          f"{torch.get_num_threads()} threads")
    noise = torch.randn(args.batch, 4, args.input_size, args.input_size, generator=g)
    y = torch.arange(args.batch) % num_classes
    grids = [("ddpm", args.ddpm_steps, ddpm_sigmas(DDPMSchedule("linear"), args.ddpm_steps)),
             ("heun", args.heun_steps, karras_sigmas(args.heun_steps))]
    print("| sampler | steps | Skip-Cache | full / cached evals | blocks run | wall / CPU time (s) "
          "| speedup wall / CPU | rel. L2 vs no cache |")
    print("|---|---|---|---|---|---|---|---|")
    settings = [None] + [SkipCacheConfig(interval=n, n_keep=args.n_keep) for n in args.intervals]
    timed(den, noise, y, "euler", karras_sigmas(2), args.cfg, settings[-1])  # warm-up: first calls are slow
    for sampler, steps, sigmas in grids:
        wall = [float("inf")] * len(settings)
        cpu = [float("inf")] * len(settings)
        results = [None] * len(settings)
        for _ in range(args.repeats):  # interleaved, best of: other load on the machine hits all settings
            for i, cache in enumerate(settings):
                (t, c), results[i] = timed(den, noise, y, sampler, sigmas, args.cfg, cache)
                wall[i], cpu[i] = min(wall[i], t), min(cpu[i], c)
        base = results[0]
        for cache, t, c, res in zip(settings, wall, cpu, results):
            name = "none" if cache is None else f"N={cache.interval}, n={cache.n_keep}"
            blocks = res.blocks_run if cache is not None else res.full_steps * args.depth
            rel = float((res.x - base.x).norm() / base.x.norm())
            print(f"| {sampler} | {steps} | {name} | {res.full_steps} / {res.cached_steps} | {blocks} | "
                  f"{t:.1f} / {c:.1f} | {wall[0] / t:.2f}x / {cpu[0] / c:.2f}x | {rel:.4f} |", flush=True)

if __name__ == "__main__":
    main()
