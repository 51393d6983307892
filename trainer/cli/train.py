"""mdt-train: validate the launch config before any process group starts (one-line errors, exit
2), then train; how a rank ends (exit statuses 0, 3, 5, 6)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import traceback

import yaml

from ..config import ConfigError, PhasePlan, TrainConfig, load_config, reference_markdown, validate
from ..console import error, say
from .common import OneLineParser, from_launcher

# The command imports the packages it runs when it runs (the noqa'd imports below): DeepSpeed, which
# the training run, sampling and evaluation pull in, takes seconds to import and prints its
# accelerator line, and --help, --reference, a config error or an export should not wait for it.


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
    from ..training.data import check_shards  # noqa: PLC0415
    from ..training.engine import deepspeed_config  # noqa: PLC0415

    validate(cfg, world_size)
    try:
        check_shards(cfg.data, cfg.align.enabled)
        data_note = "data: shards found"
    except ConfigError as err:
        data_note = f"warning: {err}"
    return "\n".join([
        f"# resolved config (world size {world_size}, {cfg.accumulation_steps(world_size)} accumulation steps)",
        yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(),
        "", "# phase plan", PhasePlan.from_config(cfg).table(),
        "", "# DeepSpeed config", json.dumps(deepspeed_config(cfg, world_size), indent=2),
        "", data_note,
    ])


def main(argv: list[str] | None = None) -> int:
    """mdt-train: validate the config before any process group starts, then train."""
    args = _train_parser().parse_args(argv)
    from_launcher(args)
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
        from ..training.data import check_shards  # noqa: PLC0415

        check_shards(cfg.data, cfg.align.enabled)
        if cfg.model.init_from:
            from ..training.init_from import check_init_from_config  # noqa: PLC0415

            check_init_from_config(cfg, world)
    except ConfigError as err:
        error(f"mdt-train: error: {err}")
        return 2
    from ..training.faults import ENV, FaultSpecError, parse_faults  # noqa: PLC0415

    try:
        parse_faults(os.environ.get(ENV, ""))
    except FaultSpecError as err:
        error(f"mdt-train: error: {err}")
        return 2
    from ..distributed import precision_problem  # noqa: PLC0415

    problem = precision_problem(cfg.deepspeed.precision)
    if problem:
        error(f"mdt-train: error: {problem}")
        return 2
    return _train(cfg)


def _train(cfg: TrainConfig) -> int:
    from ..distributed import init_distributed, shutdown  # noqa: PLC0415
    from ..training.faults import arm_faults  # noqa: PLC0415
    from ..training.shard_reader import end_data_workers  # noqa: PLC0415
    from ..training.stop import FAILED, RunStopped  # noqa: PLC0415
    from ..training.trainer import Trainer  # noqa: PLC0415
    from ..training.watchdog import StallWatchdog  # noqa: PLC0415

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    watchdog = StallWatchdog(cfg.run.stall_timeout_s, int(os.environ.get("RANK", "0"))).start()
    watchdog.beat("starting the process group (init_distributed)")
    info = init_distributed()
    code = 0
    try:
        arm_faults(info.rank)  # MDT_FAULTS: failures on purpose, for rehearsals and tests
        state = Trainer(cfg, info, watchdog.beat).train()
        say(f"done: {state.step} steps, {state.images_seen} images; run dir {cfg.run.run_dir()}")
    except RunStopped as err:
        who = f"rank {info.rank} " if err.every_rank else ""
        error(f"mdt-train: {who}stopped: {err}", every_rank=err.every_rank)
        code = err.exit_code
    except Exception as err:  # noqa: BLE001 - any other failure: its cause in one line, and out now
        traceback.print_exc()
        code = FAILED
        error(f"mdt-train: rank {info.rank} failed in {watchdog.doing}: {type(err).__name__}: {err} "
              f"(status {FAILED}; the traceback is above)", every_rank=True)
    finally:
        # Data workers ignore SIGTERM (they must outlive a stop request until the save): end them
        # here, or the interpreter's exit would wait on them forever.
        watchdog.beat("ending the data workers")
        end_data_workers()
        watchdog.beat("shutting down the process group")
        shutdown()
        watchdog.stop()
    return code
