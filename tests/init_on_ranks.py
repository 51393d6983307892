"""Weights right after a Trainer is built with model.init_from, on the ranks of a launch (tests
only):

    deepspeed --num_gpus 2 --module init_on_ranks OUT_PREFIX CONFIG.yaml [CONFIG.yaml ...]

For each config every rank builds the Trainer (engine, EMA) without training, gathers the
network's weights (whole under ZeRO-3) and the EMA's, and writes them to
OUT_PREFIX.<config index>.<rank>.safetensors as net.* and ema.*.
"""

from __future__ import annotations

import sys

from safetensors.torch import save_file

from trainer.config import load_config
from trainer.distributed import init_distributed, shutdown
from trainer.training.engine import gathered
from trainer.training.trainer import Trainer


def main(argv: list) -> int:
    args = [a for a in argv if not a.startswith("--local_rank")]
    prefix, configs = args[0], args[1:]
    info = init_distributed()
    try:
        for index, path in enumerate(configs):
            trainer = Trainer(load_config(path), info)
            net = trainer.engine.module.net
            params = list(net.parameters())
            with gathered(params):
                out = {f"net.{k}": p.detach().float().clone() for k, p in net.named_parameters()}
            with trainer.ema.full(to_rank=None) as ema:
                out.update({f"ema.{k}": v.detach().float().clone() for k, v in ema.state_dict().items()})
            save_file(out, f"{prefix}.{index}.{info.rank}.safetensors")
            trainer.monitor.close()
            trainer.engine.destroy()
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
