"""Host reads and collectives per training step of a real Trainer, on the ranks of a launch (tests
only):

    deepspeed --num_gpus 2 --module syncs_on_ranks OUT_PREFIX CONFIG.yaml [CONFIG.yaml ...]

Each config trains with two counters installed. Host reads are the tensor calls that make the host
wait for the device on an accelerator (`.item()`, `.tolist()`, `bool(t)`, `float(t)`, `.cpu()`,
`.numpy()`, `nonzero`, boolean-mask indexing); collectives are torch.distributed's calls. Each one
is filed under the step that made it (the Trainer's `beat("step N")` opens a step) and under who
made it: the innermost caller outside torch is ours (trainer/, model_zoo/), DeepSpeed's, or the
host's (the data stream's and the agreed flags' CPU tensors and gloo group, which never touch the
device). Each rank writes OUT_PREFIX.<config index>.<rank>.json.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from trainer.config import load_config
from trainer.distributed import init_distributed, shutdown
from trainer.training.trainer import Trainer

READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu", "nonzero"}
COLLECTIVES = ["all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor",
               "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast", "broadcast_object_list",
               "all_to_all", "all_to_all_single", "barrier", "gather", "scatter"]
HOST_SIDE = tuple(os.path.join("trainer", "training", name) for name in ("data.py", "shard_reader.py", "batch.py",
                                                                          "consensus.py")) + ("data_tools" + os.sep,)
TORCH = os.path.dirname(torch.__file__)


def who(stack) -> str:
    """ours / deepspeed / host / other, from the innermost frame outside torch and this file."""
    for frame in reversed(stack):
        path = frame.filename
        if path.startswith(TORCH) or path == __file__:
            continue
        if any(part in path for part in HOST_SIDE):
            return "host"
        if f"{os.sep}deepspeed{os.sep}" in path:
            return "deepspeed"
        if f"{os.sep}trainer{os.sep}" in path or f"{os.sep}model_zoo{os.sep}" in path:
            return "ours"
        return "other"
    return "other"


class Counter:
    """Counts per (label, kind, who); `label` is set by the Trainer's beats."""

    def __init__(self):
        self.label = "start"
        self.counts = collections.Counter()
        self.where = collections.Counter()  # ours: file:line of each read, to name a regression

    def note(self, kind: str, name: str) -> None:
        stack = traceback.extract_stack()[:-2]
        owner = who(stack)
        self.counts[(self.label, kind, owner)] += 1
        if owner == "ours":
            frame = next(f for f in reversed(stack) if not f.filename.startswith(TORCH) and f.filename != __file__)
            self.where[f"{self.label} {kind} {name} {os.path.basename(frame.filename)}:{frame.lineno}"] += 1

    def beat(self, what: str) -> None:
        self.label = what


class HostReads(TorchFunctionMode):
    """Notes every tensor call that reads device memory on the host."""

    def __init__(self, counter: Counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS or (name == "__getitem__" and len(args) > 1 and isinstance(args[1], torch.Tensor)
                             and args[1].dtype == torch.bool):
            self.counter.note("read", name)
        return func(*args, **(kwargs or {}))


def count_collectives(counter: Counter) -> None:
    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def counted(*args, _original=original, _name=name, **kwargs):
            counter.note("collective", _name)
            return _original(*args, **kwargs)

        setattr(dist, name, counted)


def main(argv: list) -> int:
    args = [a for a in argv if not a.startswith("--local_rank")]
    prefix, configs = args[0], args[1:]
    info = init_distributed()
    counter = Counter()
    count_collectives(counter)
    try:
        for index, path in enumerate(configs):
            counter.counts.clear()
            counter.where.clear()
            cfg = load_config(path)
            with HostReads(counter):
                Trainer(cfg, info, counter.beat).train()
            table = [{"label": label, "kind": kind, "who": owner, "count": n}
                     for (label, kind, owner), n in sorted(counter.counts.items())]
            with open(f"{prefix}.{index}.{info.rank}.json", "w") as f:
                json.dump({"counts": table, "ours": dict(counter.where)}, f, indent=1)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
