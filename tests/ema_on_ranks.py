"""The sharded EMA against the gathering one inside a ZeRO-3 engine, on the ranks of a launch
(tests only):

    deepspeed --num_gpus 2 --module ema_on_ranks OUT.json

Both averages start from the same weights and take the same 6 updates (varying decays) over 6
optimizer steps. Rank 0 writes the largest difference between the sharded average (gathered on
every rank, gathered to rank 0 for saving, and materialised by full()) and the gathering one, the
difference after a save / load round trip, and each EMA's bytes per rank.
"""

from __future__ import annotations

import json
import sys

import torch

from model_zoo.registry import build_model
from trainer.config import EMAConfig, config_from_dict
from trainer.distributed import init_distributed, shutdown
from trainer.training.ema import EMA, ShardedEMA
from trainer.training.engine import build_engine, deepspeed_config, seed_step
from trainer.training.task import TrainingModule, build_network

TINY = {"hidden_size": 32, "depth": 2, "num_heads": 2, "decoder_depth": 1, "decoder_hidden_size": 16,
        "decoder_num_heads": 2}


def largest_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main(argv: list) -> int:
    out_path = [a for a in argv if not a.startswith("--local_rank")][0]
    info = init_distributed()
    rank, world = info.rank, info.world_size
    try:
        cfg = config_from_dict({"data": {"shards": "unused", "batch_size": 8 * world, "micro_batch_size": 8},
                                "model": {"name": "MaskDiT-S/2", "options": TINY}, "optim": {"torch_adam": True,
                                                                                             "lr": 1e-2},
                                "deepspeed": {"zero_stage": 3, "precision": "fp32"}})
        kwargs = cfg.model_kwargs((3, 8, 8), 10)
        torch.manual_seed(0)
        engine = build_engine(lambda: TrainingModule(build_network(cfg, kwargs), cfg), deepspeed_config(cfg, world),
                              rank)
        live = engine.module.net
        ema_cfg = EMAConfig(decay=0.8, warmup=True)
        gathering = EMA(build_model("MaskDiT-S/2", **kwargs), ema_cfg, 8 * world)
        sharded = ShardedEMA(build_model("MaskDiT-S/2", **kwargs), ema_cfg, 8 * world, live)
        for ema in (gathering, sharded):
            ema.copy_from(live)
        start = gathering.state_dict()
        g = torch.Generator().manual_seed(100 + rank)
        for step in range(6):
            z, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
            seed_step(0, rank, step, 0)
            engine.backward(engine(z, y, 0.5).loss.mean())
            engine.step()
            for ema in (gathering, sharded):
                ema.update(live, (step + 1) * 8 * world)
        reference = gathering.state_dict()
        everywhere = sharded.state_dict()
        saved = sharded.state_for_saving(rank)
        with sharded.full() as net:
            materialised = {k: v.detach().clone() for k, v in net.state_dict().items()}
        with sharded.full(to_rank=0) as net:
            on_rank0 = None if net is None else {k: v.detach().clone() for k, v in net.state_dict().items()}
        emptied = all(p.numel() == 0 for p in sharded.module.parameters())
        reloaded = ShardedEMA(build_model("MaskDiT-S/2", **kwargs), ema_cfg, 8 * world, live)
        reloaded.load_state_dict(reference, updates=6)
        report = {
            "everywhere": largest_difference(everywhere, reference),
            "materialised": largest_difference(materialised, reference),
            "round_trip": largest_difference(reloaded.state_dict(), reference),
            "emptied_after_full": emptied, "saved_keys_elsewhere": len(saved) if rank else None,
            "moved_from_start": largest_difference(reference, start),
            "to_rank0": None if on_rank0 is None else largest_difference(on_rank0, reference),
            "bytes": {"gathering": gathering.tensor_bytes(), "sharded": sharded.tensor_bytes()},
            "updates": [gathering.updates, sharded.updates],
        }
        if rank == 0:
            report["saved"] = largest_difference(saved, reference)
        reports = [None] * world
        torch.distributed.all_gather_object(reports, report)
        engine.destroy()
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(reports, f, indent=1)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
