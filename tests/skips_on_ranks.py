"""Whether an update with non-finite gradients is skipped, at each ZeRO stage and precision, on the
ranks of a launch (tests only):

    deepspeed --num_gpus 2 --module skips_on_ranks OUT.json

Each setting builds its engine as the trainer does and trains 4 steps of 2 micro-steps; in step 2
rank 1's first loss is NaN. Rank 0 writes, per setting: engine.skipped_steps and the weights'
checksum (the sum over all weights, gathered under ZeRO-3) after each step.
"""

from __future__ import annotations

import json
import sys

import torch

from trainer.config import config_from_dict
from trainer.distributed import init_distributed, shutdown
from trainer.training.engine import build_engine, deepspeed_config, replica_checksums, seed_step
from trainer.training.task import TrainingModule, build_network

TINY = {"hidden_size": 32, "depth": 2, "num_heads": 2, "decoder_depth": 1, "decoder_hidden_size": 16,
        "decoder_num_heads": 2}
# ZeRO-3 bf16 is left out: in one of three clean-clone runs its process aborted in native code
# ("terminate called without an active exception") after five engines in one process; its skip
# was seen in a probe of its own, and test_precision trains and resumes it.
SETTINGS = [(0, "fp32"), (0, "bf16"), (1, "fp32"), (2, "bf16"), (3, "fp32")]


def one_setting(stage: int, precision: str, rank: int, world: int) -> dict:
    cfg = config_from_dict({
        "data": {"shards": "unused", "batch_size": 8 * world * 2, "micro_batch_size": 8},
        "model": {"name": "MaskDiT-S/2", "options": TINY}, "optim": {"torch_adam": True},
        "deepspeed": {"zero_stage": stage, "precision": precision}})
    kwargs = cfg.model_kwargs((3, 8, 8), 10)
    torch.manual_seed(0)
    engine = build_engine(lambda: TrainingModule(build_network(cfg, kwargs), cfg), deepspeed_config(cfg, world), rank)
    sums = []
    for step in range(4):
        for micro in range(2):
            g = torch.Generator().manual_seed(100 + rank + 10 * step + micro)
            z, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
            seed_step(0, rank, step, micro)
            loss = engine(z, y, 0.5).loss.mean()
            if (step, micro, rank) == (1, 0, 1):
                loss = loss * float("nan")
            engine.backward(loss)
            engine.step()
        sums.append(replica_checksums(engine.module)[0][0])
    skipped = engine.skipped_steps
    engine.destroy()
    return {"skipped": skipped, "checksums": sums}


def main(argv: list) -> int:
    out_path = [a for a in argv if not a.startswith("--local_rank")][0]
    info = init_distributed()
    try:
        report = {f"{stage}-{precision}": one_setting(stage, precision, info.rank, info.world_size)
                  for stage, precision in SETTINGS}
        if info.rank == 0:
            with open(out_path, "w") as f:
                json.dump(report, f, indent=1)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
