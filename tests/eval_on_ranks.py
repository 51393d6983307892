"""Run one in-loop evaluation of a checkpoint's EMA weights on the ranks of a launch, as the trainer
does, and write rank 0's metrics to a JSON file (tests only):

    deepspeed --num_gpus N --module eval_on_ranks CHECKPOINT OUT.json [KEY=VALUE ...]

The launch config is the checkpoint's own, with the KEY=VALUE overrides (give run.output_dir: the
evaluation appends to that run's metrics.jsonl); no engine is built. `evaluate` is the same work for
a world of one inside the calling process (no launch).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
from safetensors.torch import load_file

from model_zoo.registry import build_model
from trainer.checkpoints import EMA_FILE, read_record
from trainer.config import load_config
from trainer.distributed import DistInfo, init_distributed, shutdown
from trainer.training.data import build_latent_loader
from trainer.training.ema import EMA
from trainer.training.evaluator import build_evaluator
from trainer.training.monitor import Monitor


def evaluate(checkpoint: str, overrides: list, info: DistInfo, rng_seed: int = 12345) -> dict:
    """One evaluation of the checkpoint on this rank of `info`'s world; rank 0's metrics."""
    record = read_record(checkpoint)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump(record.config, f)  # JSON is YAML
    cfg = load_config(f.name, overrides + ["monitor.tensorboard=false"])
    os.remove(f.name)
    net = build_model(record.model_name, **record.model_kwargs)
    ema = EMA(net, cfg.ema, cfg.data.batch_size)
    ema.load_state_dict(load_file(f"{checkpoint}/{EMA_FILE}"), record.ema_updates)
    loader = build_latent_loader(cfg.data.shards, 8, info.rank, info.world_size, num_workers=0,
                                 holdout_fraction=0.0 if cfg.data.val_shards else cfg.data.val_fraction)
    monitor = Monitor(cfg.monitor, cfg.run.run_dir(), info.rank, record.step, info.device, 1.0)
    evaluator = build_evaluator(cfg, info, ema, loader, monitor, record.step)
    state = record.state
    torch.manual_seed(rng_seed)  # the evaluation must not depend on the global RNG: scramble it
    return evaluator.run(state, "eval", final=True)


def main(argv: list) -> int:
    args = [a for a in argv if not a.startswith("--local_rank")]  # the launcher adds it first
    checkpoint, out, overrides = args[0], args[1], args[2:]
    info = init_distributed()
    try:
        metrics = evaluate(checkpoint, overrides, info)
        if info.rank == 0:
            with open(out, "w") as f:
                json.dump(metrics, f)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
