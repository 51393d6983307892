"""Every console entry point of the trainer package, thin: parse, validate before any process group
starts (one-line errors, exit 2), call the package that does the work, report.

    deepspeed --num_gpus 8 -m trainer.cli --config launch_configs/maskdit_xl2_256.yaml    # mdt-train
    mdt-train --config launch_configs/digits_demo.yaml --set optim.lr=5e-4 --dry-run
    mdt-export runs/NAME/checkpoints/step00010000 --out maskdit_ema.safetensors
    mdt-convert DiT-XL-2-256x256.pt --out dit_xl2.safetensors   # a published release -> our export
    mdt-universal runs/NAME/checkpoints/step00010000   # then resume on another number of ranks
    mdt-sample runs/NAME --per-class 10 --out samples/   (deepspeed ... --module trainer.sample ...)
    mdt-eval samples/samples.npz ref.npz --inception pt_inception-2015-12-05-6726825d.pth
    mdt-eval --history runs/NAME                        # the run's in-loop evaluations as a table
    mdt-study launch_configs/studies/digits.yaml         # variants x seeds under one budget -> study.md

Exit statuses: 0 done, 2 bad input, 3 a training run stopped on a problem a rerun meets again,
4 a stalled rank (the watchdog), 5 a training run stopped on request, 6 a rank that failed on any
other exception (its cause in one line after the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from typing import Collection, List, NoReturn, Optional

import yaml

from .checkpoints import COMPLETE, WEIGHT_KINDS, CheckpointError, export_weights, is_complete, to_universal
from .config import ConfigError, TrainConfig, load_config, reference_markdown, validate
from .diffusion import SAMPLERS

# Each command imports the packages it runs when it runs (the noqa'd imports below): DeepSpeed, which
# the training run, sampling and evaluation pull in, takes seconds to import and prints its
# accelerator line, and --help, --reference, a config error or an export should not wait for it.


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line naming the culprit (exit 2), no usage block."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _from_launcher(args: argparse.Namespace) -> None:
    """The deepspeed launcher appends --local_rank=N; torchrun sets LOCAL_RANK itself."""
    if getattr(args, "local_rank", None) is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))


# ----------------------------------------------------------------------------- mdt-train


def _train_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="mdt-train", description="Train a (masked) diffusion transformer with DeepSpeed.")
    p.add_argument("--config", help="YAML launch config (see launch_configs/)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. --set optim.lr=5e-5 run.name=x (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, the phase plan and the DeepSpeed JSON, then exit")
    p.add_argument("--reference", action="store_true", help="print every config key with its default and meaning")
    p.add_argument("--world-size", type=int, default=None,
                   help="world size assumed by --dry-run (default: $WORLD_SIZE or 1)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # appended by the deepspeed launcher
    return p


def _world_size() -> int:
    """The world size the launcher announced ($WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def dry_run(cfg: TrainConfig, world_size: int) -> str:
    """The text --dry-run prints: config YAML, phase plan, DeepSpeed JSON, and data status."""
    from .training.data import check_shards  # noqa: PLC0415
    from .training.engine import deepspeed_config  # noqa: PLC0415

    validate(cfg, world_size)
    try:
        check_shards(cfg.data, cfg.align.enabled)
        data_note = "data: shards found"
    except ConfigError as err:
        data_note = f"warning: {err}"
    return "\n".join([
        f"# resolved config (world size {world_size}, {cfg.accumulation_steps(world_size)} accumulation steps)",
        yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(),
        "", "# phase plan", cfg.phase_plan().table(),
        "", "# DeepSpeed config", json.dumps(deepspeed_config(cfg, world_size), indent=2),
        "", data_note,
    ])


def main(argv: Optional[List[str]] = None) -> int:
    """mdt-train: validate the config before any process group starts, then train."""
    args = _train_parser().parse_args(argv)
    _from_launcher(args)
    if args.reference:
        print(reference_markdown())
        return 0
    world = args.world_size or _world_size()
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, world)
        if args.dry_run:
            print(dry_run(cfg, world))
            return 0
        from .training.data import check_shards  # noqa: PLC0415

        check_shards(cfg.data, cfg.align.enabled)
        if cfg.model.init_from:
            from .training.init_from import check_init_from_config  # noqa: PLC0415

            check_init_from_config(cfg, world)
    except ConfigError as err:
        print(f"mdt-train: error: {err}", file=sys.stderr)
        return 2
    from .training.faults import ENV, FaultSpecError, parse_faults  # noqa: PLC0415

    try:
        parse_faults(os.environ.get(ENV, ""))
    except FaultSpecError as err:
        print(f"mdt-train: error: {err}", file=sys.stderr)
        return 2
    from .distributed import precision_problem  # noqa: PLC0415

    problem = precision_problem(cfg.deepspeed.precision)
    if problem:
        print(f"mdt-train: error: {problem}", file=sys.stderr)
        return 2
    return _train(cfg)


def _train(cfg: TrainConfig) -> int:
    from .distributed import init_distributed, shutdown  # noqa: PLC0415
    from .training.data import end_data_workers  # noqa: PLC0415
    from .training.faults import arm_faults  # noqa: PLC0415
    from .training.stop import FAILED, RunStopped  # noqa: PLC0415
    from .training.trainer import Trainer  # noqa: PLC0415
    from .training.watchdog import StallWatchdog  # noqa: PLC0415

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    watchdog = StallWatchdog(cfg.run.stall_timeout_s, int(os.environ.get("RANK", "0"))).start()
    watchdog.beat("starting the process group (init_distributed)")
    info = init_distributed()
    code = 0
    try:
        arm_faults(info.rank)  # MDT_FAULTS: failures on purpose, for rehearsals and tests
        state = Trainer(cfg, info, watchdog.beat).train()
        if info.rank == 0:
            print(f"done: {state.step} steps, {state.images_seen} images; run dir {cfg.run.run_dir()}", flush=True)
    except RunStopped as err:
        if info.rank == 0 or err.every_rank:
            who = f"rank {info.rank} " if err.every_rank else ""
            print(f"mdt-train: {who}stopped: {err}", file=sys.stderr, flush=True)
        code = err.exit_code
    except Exception as err:  # noqa: BLE001 - any other failure: its cause in one line, and out now
        traceback.print_exc()
        code = FAILED
        print(f"mdt-train: rank {info.rank} failed in {watchdog.doing}: {type(err).__name__}: {err} "
              f"(status {FAILED}; the traceback is above)", file=sys.stderr, flush=True)
    finally:
        # Data workers ignore SIGTERM (they must outlive a stop request until the save): end them
        # here, or the interpreter's exit would wait on them forever.
        watchdog.beat("ending the data workers")
        end_data_workers()
        watchdog.beat("shutting down the process group")
        shutdown()
        watchdog.stop()
    return code


# ----------------------------------------------------------------------------- mdt-export, mdt-universal


def export_main(argv: Optional[List[str]] = None) -> int:
    """mdt-export: the EMA (default) or live weights of a checkpoint as one safetensors file, or
    (--format diffusers) anything mdt-sample reads as a diffusers DiT folder."""
    p = OneLineParser(prog="mdt-export", description=export_main.__doc__)
    p.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/NAME/checkpoints/step00010000 (with "
                                      "--format diffusers also an export or a release file)")
    p.add_argument("--out", required=True, help="output .safetensors path, or the folder for --format diffusers")
    p.add_argument("--which", choices=WEIGHT_KINDS, default=None,
                   help="ema (default) or model: which weights of a checkpoint (an export holds one kind)")
    p.add_argument("--format", choices=("safetensors", "diffusers"), default="safetensors",
                   help="safetensors: our file for mdt-sample / init_from; diffusers: a DiTTransformer2DModel folder "
                        "with a scheduler config")
    _release_options(p)
    args = p.parse_args(argv)
    if args.format == "diffusers":
        return _export_diffusers(args)
    if not is_complete(args.checkpoint):
        print(f"mdt-export: error: {args.checkpoint} is not a complete checkpoint (no {COMPLETE} file)",
              file=sys.stderr)
        return 2
    try:
        meta = export_weights(args.checkpoint, args.out, args.which or "ema")
    except CheckpointError as err:
        print(f"mdt-export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({meta['weights']} weights of {meta['model']} at step {meta['step']})")
    return 0


def _export_diffusers(args: argparse.Namespace) -> int:
    from .checkpoints import read_network  # noqa: PLC0415
    from .checkpoints.diffusers_export import export_diffusers  # noqa: PLC0415

    try:
        src = read_network(args.checkpoint, args.which, args.layout, args.num_heads, args.decoder_num_heads)
        export_diffusers(src, args.out)
    except CheckpointError as err:
        print(f"mdt-export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: DiTTransformer2DModel.from_pretrained({args.out!r}) and its scheduler config "
          f"({src.kind} {src.model_name}); see docs/releases.md for the timestep-embedding difference")
    return 0


def _release_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", choices=("dit", "sit", "maskdit"), default=None,
                   help="a release's layout (default: from its keys; a DiT-layout file named *sit* is SiT's)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads of a release with a non-standard width (the weights do not say)")
    p.add_argument("--decoder-num-heads", type=int, default=None,
                   help="decoder heads of a MaskDiT release with a non-standard decoder width")


def convert_main(argv: Optional[List[str]] = None) -> int:
    """mdt-convert: a published DiT, SiT or MaskDiT checkpoint (or anything mdt-sample reads) as an
    mdt-export safetensors file, which mdt-sample, mdt-export and model.init_from take."""
    from .checkpoints import read_network, write_export  # noqa: PLC0415

    p = OneLineParser(prog="mdt-convert", description=convert_main.__doc__)
    p.add_argument("source", help="e.g. DiT-XL-2-256x256.pt, a MaskDiT release .pt, a checkpoint directory")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--weights", choices=WEIGHT_KINDS, default=None,
                   help="ema (default) or model (a checkpoint's live weights)")
    _release_options(p)
    args = p.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        p.error(f"--out must end in .safetensors, got {args.out}")
    try:
        src = read_network(args.source, args.weights, args.layout, args.num_heads, args.decoder_num_heads)
        write_export(args.out, src.state_dict, src.model_name, src.model_kwargs, src.diffusion, src.dataset,
                     src.step, src.weights, source=f"{src.kind}:{os.path.abspath(src.path)}")
    except CheckpointError as err:
        print(f"mdt-convert: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {src.kind} {src.model_name} {json.dumps(src.model_kwargs)}")
    return 0


def universal_main(argv: Optional[List[str]] = None) -> int:
    """mdt-universal: convert a ZeRO checkpoint so that training resumes from it on any number of ranks."""
    p = OneLineParser(prog="mdt-universal", description=universal_main.__doc__)
    p.add_argument("checkpoint", help="a complete checkpoint directory, e.g. runs/NAME/checkpoints/step00010000")
    p.add_argument("--out", default=None,
                   help="output directory (default: CHECKPOINT_universal, where the training command finds it "
                        "when the number of ranks changed; elsewhere, pass --set checkpoint.resume=OUT)")
    p.add_argument("--workers", type=int, default=1, help="processes DeepSpeed uses to extract and merge shards")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    try:
        out = to_universal(args.checkpoint, args.out, args.workers)
    except CheckpointError as err:
        print(f"mdt-universal: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}: rerun the training command with the new number of ranks to resume from it")
    return 0


# ----------------------------------------------------------------------------- mdt-sample


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
    p.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
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
    _release_options(p)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # from the deepspeed launcher
    return p


def sample_main(argv: Optional[List[str]] = None) -> int:
    """mdt-sample: validate everything (checkpoint, classes, sampler, Skip-Cache, VAE) before any
    process group starts; errors are one line and exit 2."""
    from .distributed import init_distributed, launcher_env, shutdown  # noqa: PLC0415
    from .sample.generate import (  # noqa: PLC0415
        SampleSettings,
        check_settings,
        generate,
        grid_columns,
        make_labels,
        parse_classes,
        parse_pair,
    )
    from .sample.loading import SampleError, load_decoder, load_model  # noqa: PLC0415

    args = _sample_parser().parse_args(argv)
    _from_launcher(args)
    env = launcher_env()
    rank, world, device = env.rank, env.world_size, env.device
    try:
        if args.per_class is None and args.num is None:
            raise SampleError("give --per-class K or --num-images N")
        settings = SampleSettings(args.sampler, args.steps, args.guidance_scale,
                                  parse_pair(args.guidance_interval, "--guidance-interval"), args.skip_cache,
                                  args.skip_keep, parse_pair(args.skip_full_sigma, "--skip-full-sigma"),
                                  args.batch_size, args.seed, args.guidance_channels)
        if args.skip_cache is not None and args.skip_cache < 1:
            raise SampleError(f"--skip-cache must be >= 1, got {args.skip_cache}")
        model = load_model(args.checkpoint, args.weights, device, args.layout, args.num_heads,
                           args.decoder_num_heads)
        num_classes = int(model.dataset.get("num_classes") or model.model_kwargs["num_classes"])
        classes = parse_classes(args.classes, num_classes, model.dataset.get("class_names"))
        labels = make_labels(classes, args.per_class, args.num)
        check_settings(model, settings)
        decoder = load_decoder(model, args.vae, device)
    except SampleError as err:
        if rank == 0:
            print(f"mdt-sample: error: {err}", file=sys.stderr)
        return 2
    if world > 1:
        init_distributed()
    try:
        if rank == 0:
            print(f"sampling {len(labels)} images of {len(classes)} class(es) from {model.source} "
                  f"({model.model_name}, step {model.step}, {model.weights} weights) on {world} rank(s): "
                  f"{settings.sampler}, {settings.resolved_steps()} steps, guidance {settings.guidance_scale:g}",
                  flush=True)
        result = generate(model, labels, args.out, settings, args.vae, rank, world, device, not args.no_png,
                          args.grid, grid_columns(args.per_class, len(classes)), not args.quiet, decoder=decoder)
        if rank == 0:
            full, cached = result.steps_per_batch
            print(f"model evaluations per batch: {full} full + {cached} cached"
                  + (f" (Skip-Cache interval {settings.skip_cache_interval or 2}, keep {settings.skip_cache_keep})"
                     if cached or settings.skip_cache_interval else ""), flush=True)
            print(f"rank 0: {result.full_steps} full + {result.cached_steps} cached steps in "
                  f"{result.seconds:.1f}s", flush=True)
            print(f"wrote {result.npz} (arr_0 uint8 {len(labels)} images, arr_1 labels)", flush=True)
            print(f"grid: {result.grid}", flush=True)
    finally:
        if world > 1:
            shutdown()
    return 0


# ----------------------------------------------------------------------------- mdt-eval


def _eval_parser(metrics: Collection[str]) -> argparse.ArgumentParser:
    p = OneLineParser(prog="mdt-eval", description="Frechet distances (Inception FID, digits FD) and digit accuracy "
                                                   "of a generated image set against a reference set.")
    p.add_argument("generated", nargs="?", default=None,
                   help="generated images: .npz (arr_0 images, arr_1 labels) or a directory of images")
    p.add_argument("reference", nargs="?", default=None,
                   help="reference images: .npz (arr_0, or precomputed mu/sigma), a directory, or digits:train / "
                        "digits:heldout (default for the digits metrics: digits:train)")
    p.add_argument("--metrics", default="fid", help=f"comma-separated, from {', '.join(metrics)} (default fid)")
    p.add_argument("--inception", default=None,
                   help="FID Inception weights (pt_inception-2015-12-05-6726825d.pth; default $MDT_INCEPTION_WEIGHTS)")
    p.add_argument("--digits-classifier", default=None,
                   help="digit classifier cache file (default $MDT_CACHE_DIR or ~/.cache/masked-diffusion-trainer; "
                        "trained there on first use)")
    p.add_argument("--batch-size", type=int, default=50, help="Inception batch size")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")
    p.add_argument("--history", metavar="RUN_DIR", default=None,
                   help="instead: print the table of a run's in-loop evaluations (RUN_DIR/metrics.jsonl)")
    return p


def eval_main(argv: Optional[List[str]] = None) -> int:
    """mdt-eval: print one `name: value` line per metric (and JSON with --json)."""
    from .evaluation.errors import EvalError  # noqa: PLC0415
    from .evaluation.history import history_table, read_metrics  # noqa: PLC0415
    from .evaluation.metrics import METRICS, evaluate  # noqa: PLC0415

    parser = _eval_parser(METRICS)
    args = parser.parse_args(argv)
    if args.history:
        try:
            print(history_table(read_metrics(args.history)))
        except EvalError as err:
            print(f"mdt-eval: error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.generated is None:
        parser.error("give the generated images (or --history RUN_DIR)")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    try:
        results = evaluate(args.generated, args.reference, metrics, args.inception, args.digits_classifier,
                           args.batch_size)
    except EvalError as err:
        print(f"mdt-eval: error: {err}", file=sys.stderr)
        return 2
    for name in metrics:
        value = results[name]
        print(f"{name}: {METRICS[name].format(value)}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


# ----------------------------------------------------------------------------- mdt-study


def study_main(argv: Optional[List[str]] = None) -> int:
    """mdt-study: train every variant x seed of a study under one budget (resuming, skipping finished
    runs), judge them post hoc, write study.md, study.png and study.json; errors are one line."""
    p = OneLineParser(prog="mdt-study", description="Train the variants of a launch config under one budget, "
                                                    "several seeds each, and compare them (study.md, study.png).")
    p.add_argument("study", help="study YAML (its keys: trainer/evaluation/study_spec.py)")
    p.add_argument("--dry-run", action="store_true", help="print each run's command, steps and state; launch nothing")
    args = p.parse_args(argv)
    from .evaluation.study import run_study  # noqa: PLC0415
    from .evaluation.study_spec import StudyError  # noqa: PLC0415

    try:
        run_study(args.study, dry_run=args.dry_run)
    except StudyError as err:
        print(f"mdt-study: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
