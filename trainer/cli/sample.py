"""mdt-sample: validate everything before any process group starts, then generate over the
launcher's ranks."""

from __future__ import annotations

import argparse

from ..console import error, say
from ..diffusion import SAMPLERS
from .common import OneLineParser, from_launcher, release_options

# The command imports the packages it runs when it runs (the noqa'd imports below): DeepSpeed, which
# the training run, sampling and evaluation pull in, takes seconds to import and prints its
# accelerator line, and --help, --reference, a config error or an export should not wait for it.


def _sample_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="mdt-sample",
                      description="Generate class-conditional images from a checkpoint or an exported weights "
                                  "file; write PNGs, a grid and an ADM-layout .npz.")
    p.add_argument("checkpoint", help="checkpoint tag dir, checkpoints root or run dir (newest complete "
                                      "checkpoint), an mdt-export .safetensors file, or a published DiT / MaskDiT "
                                      "release .pt")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--weights", default=None, help="ema (default) or model (live weights of a checkpoint)")
    p.add_argument("--classes", default="all", help="'all' or comma-separated class indices / names")
    count = p.add_mutually_exclusive_group()
    count.add_argument("--per-class", type=int, default=None, help="images per class (grouped by class)")
    count.add_argument("--num-images", "--num", dest="num", type=int, default=None,
                       help="total images, cycling through the classes (spell it --num-images under the deepspeed "
                            "launcher, whose own parser takes --num for an abbreviation)")
    p.add_argument("--sampler", default="heun", help=f"{', '.join(SAMPLERS)} (default heun)")
    usual = ", ".join(f"{name} {spec.default_steps}" for name, spec in SAMPLERS.items())
    p.add_argument("--steps", type=int, default=None, help=f"sampling steps (default: {usual})")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="guidance scale (1: none)")
    p.add_argument("--guidance", default="cfg", type=lambda text: text.replace("-", "_"),
                   help="the weak branch of guidance: cfg (the null class: classifier-free guidance, default) or "
                        "path-drop (the null class with a SPRINT model's sparse path skipped: path-drop guidance, "
                        "cheaper per step)")
    p.add_argument("--guidance-interval", default=None, metavar="LO,HI", help="guide only where LO < sigma <= HI")
    p.add_argument("--guidance-channels", type=int, default=None, metavar="K",
                   help="guide the first K latent channels only (3 reproduces the DiT release's sampler; default all)")
    p.add_argument("--skip-cache", type=int, default=None, metavar="N",
                   help="Skip-Cache: one full step then N-1 cached steps (skip models only)")
    p.add_argument("--skip-keep", type=int, default=1, help="Skip-Cache: blocks run at each end on cached steps")
    p.add_argument("--skip-full-sigma", default=None, metavar="LO,HI",
                   help="Skip-Cache: always run the full model where LO <= sigma <= HI")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch on each rank")
    p.add_argument("--seed", type=int, default=0, help="image i's noise comes from (seed, i)")
    p.add_argument("--vae", default=None, help="VAE directory or hub id (default: the dataset's encoder id)")
    p.add_argument("--no-png", action="store_true", help="write only the .npz and the grid")
    p.add_argument("--grid", type=int, default=100, help="images in grid.png (default 100)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    release_options(p)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # from the deepspeed launcher
    return p


def sample_main(argv: list[str] | None = None) -> int:
    """mdt-sample: validate everything (checkpoint, classes, sampler, Skip-Cache, VAE) before any
    process group starts; errors are one line and exit 2."""
    from ..distributed import init_distributed, launcher_env, shutdown  # noqa: PLC0415
    from ..sample.generate import (  # noqa: PLC0415
        SampleSettings,
        check_settings,
        generate,
        grid_columns,
        make_labels,
        parse_classes,
        parse_pair,
    )
    from ..sample.loading import SampleError, load_decoder, load_model  # noqa: PLC0415

    args = _sample_parser().parse_args(argv)
    from_launcher(args)
    env = launcher_env()
    rank, world, device = env.rank, env.world_size, env.device
    try:
        if args.per_class is None and args.num is None:
            raise SampleError("give --per-class K or --num-images N")
        settings = SampleSettings(sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance_scale,
                                  guidance_interval=parse_pair(args.guidance_interval, "--guidance-interval"),
                                  skip_cache_interval=args.skip_cache, skip_cache_keep=args.skip_keep,
                                  skip_cache_full_sigma=parse_pair(args.skip_full_sigma, "--skip-full-sigma"),
                                  batch_size=args.batch_size, seed=args.seed, guidance_channels=args.guidance_channels,
                                  guidance=args.guidance)
        if args.skip_cache is not None and args.skip_cache < 1:
            raise SampleError(f"--skip-cache must be >= 1, got {args.skip_cache}")
        model = load_model(args.checkpoint, args.weights, device, layout=args.layout, num_heads=args.num_heads,
                           decoder_num_heads=args.decoder_num_heads)
        num_classes = int(model.dataset.get("num_classes") or model.model_kwargs["num_classes"])
        classes = parse_classes(args.classes, num_classes, model.dataset.get("class_names"))
        labels = make_labels(classes, args.per_class, args.num)
        check_settings(model, settings)
        decoder = load_decoder(model, args.vae, device)
    except SampleError as err:
        error(f"mdt-sample: error: {err}")
        return 2
    if world > 1:
        init_distributed()
    try:
        say(f"sampling {len(labels)} images of {len(classes)} class(es) from {model.source} ({model.model_name}, "
            f"step {model.step}, {model.weights} weights) on {world} rank(s): {settings.sampler}, "
            f"{settings.resolved_steps()} steps, guidance {settings.guidance_scale:g}"
            + (f" ({settings.guidance.replace('_', '-')})" if settings.guidance_scale != 1 else ""))
        result = generate(model, labels, args.out, settings, vae=args.vae, rank=rank, world_size=world, device=device,
                          png=not args.no_png, grid_count=args.grid,
                          grid_cols=grid_columns(args.per_class, len(classes)), progress=not args.quiet,
                          decoder=decoder)
        full, cached = result.steps_per_batch
        say(f"model evaluations per batch: {full} full + {cached} cached"
            + (f" (Skip-Cache interval {settings.skip_cache_interval or 2}, keep {settings.skip_cache_keep})"
               if cached or settings.skip_cache_interval else ""))
        say(f"rank 0: {result.full_steps} full + {result.cached_steps} cached steps in {result.seconds:.1f}s; "
            f"{result.gflops_per_image:.3g} network GFLOPs per image (counted)")
        say(f"wrote {result.npz} (arr_0 uint8 {len(labels)} images, arr_1 labels)")
        say(f"grid: {result.grid}")
    finally:
        if world > 1:
            shutdown()
    return 0
