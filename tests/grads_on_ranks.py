"""Gradients of one training micro-step inside a ZeRO-3 DeepSpeed engine with each activation
checkpointing mode, on the ranks of a launch (tests only):

    deepspeed --num_gpus 2 --module grads_on_ranks OUT.json

Each mode builds its own engine with the same random (non-zero: adaLN-Zero would leave most
gradients 0) weights, runs one micro-step on the same batch and noise, and gathers every full
gradient. Rank 0 writes, per mode: the largest gradient difference from mode 'none', the number
of block-body runs during backward (recomputation).
"""

from __future__ import annotations

import json
import sys

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad

from trainer.config import config_from_dict
from trainer.distributed import init_distributed, shutdown
from trainer.training.engine import build_engine, deepspeed_config, seed_step
from trainer.training.task import TrainingModule, build_network

MODES = [("none", False), ("torch", False), ("deepspeed", False), ("fairscale", False), ("fairscale", True)]
TINY = {"hidden_size": 32, "depth": 2, "num_heads": 2, "decoder_depth": 1, "decoder_hidden_size": 16,
        "decoder_num_heads": 2}


def one_mode(mode: str, offload: bool, rank: int, world: int) -> dict:
    cfg = config_from_dict({
        "data": {"shards": "unused", "batch_size": 8 * world, "micro_batch_size": 8},
        "model": {"name": "MaskDiT-S/2", "options": TINY, "activation_checkpointing": mode,
                  "offload_activations": offload},
        "optim": {"torch_adam": True}, "deepspeed": {"zero_stage": 3, "precision": "fp32"}})
    kwargs = cfg.model_kwargs((3, 8, 8), 10)
    engine = build_engine(lambda: TrainingModule(build_network(cfg, kwargs), cfg), deepspeed_config(cfg, world), rank)
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        if rank == 0:
            g = torch.Generator().manual_seed(1)
            for p in params:
                p.data.copy_(0.05 * torch.randn(p.shape, generator=g))
    runs = [0]
    blocks = [b for stack in (engine.module.net.blocks, engine.module.net.decoder) for b in stack.blocks]
    for block in blocks:  # the attention inside each block runs again when the block is recomputed
        block.attn.register_forward_hook(lambda *_: runs.__setitem__(0, runs[0] + 1))
    g = torch.Generator().manual_seed(100 + rank)
    z, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    seed_step(0, rank, 0, 0)
    out = engine(z, y, 0.5)
    forward_runs = runs[0]
    engine.backward(out.loss.mean())
    grads = {name: safe_get_full_grad(p).clone() for name, p in engine.module.named_parameters()}
    engine.destroy()
    return {"grads": grads, "blocks": len(blocks), "forward_runs": forward_runs,
            "backward_runs": runs[0] - forward_runs, "loss": float(out.loss.mean())}


def main(argv: list) -> int:
    out_path = [a for a in argv if not a.startswith("--local_rank")][0]
    info = init_distributed()
    try:
        results = {f"{m}{'+offload' if o else ''}": one_mode(m, o, info.rank, info.world_size) for m, o in MODES}
        plain = results["none"]["grads"]
        report = {}
        for name, r in results.items():
            diff = max(float((r["grads"][k] - plain[k]).abs().max()) for k in plain)
            moved = sum(int(g.abs().sum() > 0) for g in r["grads"].values())
            report[name] = {"max_grad_diff": diff, "nonzero_grads": moved, "params": len(plain),
                            **{k: r[k] for k in ("blocks", "forward_runs", "backward_runs", "loss")}}
        if info.rank == 0:
            with open(out_path, "w") as f:
                json.dump(report, f, indent=1)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
