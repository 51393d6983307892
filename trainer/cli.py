"""Command-line entry points: `mdt-train` (launch with the deepspeed launcher) and `mdt-export`.

    deepspeed --num_gpus 8 -m trainer.cli --config launch_configs/maskdit_xl2_256.yaml
    mdt-train --config launch_configs/digits_demo.yaml --set optim.lr=5e-4 --dry-run
    mdt-export runs/NAME/checkpoints/step00010000 --out maskdit_ema.safetensors
    mdt-universal runs/NAME/checkpoints/step00010000   # then resume on another number of ranks
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

import yaml

from .config import ConfigError, TrainConfig, load_config, to_deepspeed_json, validate
from .phases import PhasePlan


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line naming the culprit (exit 2), no usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="mdt-train", description="Train a (masked) diffusion transformer with DeepSpeed.")
    p.add_argument("--config", help="YAML launch config (see launch_configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=5e-5 (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, the phase plan and the DeepSpeed JSON, then exit")
    p.add_argument("--reference", action="store_true", help="print every config key with its default and meaning")
    p.add_argument("--world-size", type=int, default=None, help="world size assumed by --dry-run (default: $WORLD_SIZE or 1)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # appended by the deepspeed launcher
    return p


def dry_run(cfg: TrainConfig, world_size: int) -> str:
    """The text --dry-run prints: config YAML, phase plan, DeepSpeed JSON, and data status."""
    validate(cfg, world_size, check_data=False)
    try:
        validate(cfg, world_size, check_data=True)
        data_note = "data: shards found"
    except ConfigError as err:
        data_note = f"warning: {err}"
    plan = PhasePlan(cfg.phases, cfg.run.total_steps, cfg.optim.warmup_steps)
    return "\n".join([
        f"# resolved config (world size {world_size}, {cfg.accumulation_steps(world_size)} accumulation steps)",
        yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(),
        "", "# phase plan", plan.table(),
        "", "# DeepSpeed config", json.dumps(to_deepspeed_json(cfg, world_size), indent=2),
        "", data_note,
    ])


def main(argv: Optional[List[str]] = None) -> int:
    """mdt-train: validate the config before any process group starts, then train."""
    args = _parser().parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from .distributed import world_size_from_env

    world = args.world_size or world_size_from_env()
    if args.reference:
        from .config import reference_markdown

        print(reference_markdown())
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            print(dry_run(cfg, world))
            return 0
        validate(cfg, world)
    except ConfigError as err:
        print(f"mdt-train: error: {err}", file=sys.stderr)
        return 2
    return _train(cfg)


def _train(cfg: TrainConfig) -> int:
    from .distributed import init_distributed, shutdown
    from .loop import RunStopped, train
    from .watchdog import StallWatchdog

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    watchdog = StallWatchdog(cfg.run.stall_timeout_s, int(os.environ.get("RANK", 0))).start()
    watchdog.beat("starting the process group (init_distributed)")
    info = init_distributed()
    code = 0
    try:
        state = train(cfg, info, watchdog.beat)
        if info.rank == 0:
            print(f"done: {state.step} steps, {state.images_seen} images; run dir {cfg.run.run_dir()}", flush=True)
    except RunStopped as err:
        if info.rank == 0:
            print(f"mdt-train: stopped: {err}", file=sys.stderr, flush=True)
        code = err.exit_code
    finally:
        watchdog.beat("shutting down the process group")
        shutdown()
        watchdog.stop()
    return code


def export_main(argv: Optional[List[str]] = None) -> int:
    """mdt-export: one safetensors file of EMA (default) or live weights from a checkpoint."""
    p = argparse.ArgumentParser(prog="mdt-export", description=export_main.__doc__)
    p.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/NAME/checkpoints/step00010000")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--which", choices=["ema", "model"], default="ema")
    args = p.parse_args(argv)
    from .checkpoint import COMPLETE, export_weights

    if not os.path.exists(os.path.join(args.checkpoint, COMPLETE)):
        print(f"mdt-export: error: {args.checkpoint} is not a complete checkpoint (no {COMPLETE} file)", file=sys.stderr)
        return 2
    meta = export_weights(args.checkpoint, args.out, args.which)
    print(f"wrote {args.out} ({meta['weights']} weights of {meta['model']} at step {meta['step']})")
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
    from .checkpoint import CheckpointError, to_universal

    try:
        out = to_universal(args.checkpoint, args.out, args.workers)
    except CheckpointError as err:
        print(f"mdt-universal: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}: rerun the training command with the new number of ranks to resume from it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
