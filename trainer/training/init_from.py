"""Starting a run from existing weights (`model.init_from`): which of the model's tensors the source
covers, checked before launch (one line; `model.init_strict` refuses a partial match), and copying
them into the freshly initialised network before ZeRO partitions it."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
from torch import nn

from data_tools.format import DataToolsError
from data_tools.manifest import resolve_shards
from model_zoo.registry import build_model

from ..checkpoints import CheckpointError, NetworkSource, read_network
from ..config import ConfigError, TrainConfig
from .checkpointer import resume_target
from .stop import RunStopped


@dataclass
class InitPlan:
    """Names of the model's tensors the source fills (`loaded`), lacks (`fresh`), holds in another
    shape (`reshaped`: name -> (source shape, ours)), and the source's tensors the model has no use
    for (`unused`)."""

    source: str
    loaded: List[str] = field(default_factory=list)
    fresh: List[str] = field(default_factory=list)
    reshaped: Dict[str, Tuple[tuple, tuple]] = field(default_factory=dict)
    unused: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    """What else differs between the source and this run (e.g. the preconditioning)."""

    @property
    def exact(self) -> bool:
        """Whether the source covers every tensor of the model and nothing else."""
        return not (self.fresh or self.reshaped or self.unused)

    def line(self) -> str:
        """What the plan does, in one line."""
        total = len(self.loaded) + len(self.fresh) + len(self.reshaped)
        parts = [f"model.init_from: {len(self.loaded)} of {total} tensors from {self.source}"]
        if self.fresh:
            parts.append(f"initialised as usual (not in the source): {_names(self.fresh)}")
        if self.reshaped:
            shown = [f"{k} {list(a)} vs ours {list(b)}" for k, (a, b) in list(self.reshaped.items())[:3]]
            more = f" and {len(self.reshaped) - 3} more" if len(self.reshaped) > 3 else ""
            parts.append(f"initialised as usual (another shape in the source): {', '.join(shown)}{more}")
        if self.unused:
            parts.append(f"not used from the source: {_names(self.unused)}")
        return "; ".join(parts + self.notes)


def _names(names: List[str]) -> str:
    """Names grouped by module: `decoder.blocks.*` for indexed ones, else the owning module."""
    groups: Dict[str, int] = {}
    for name in names:
        indexed = re.match(r"^(.*?)\.\d+\.", name)
        key = f"{indexed.group(1)}.*" if indexed else (name.rsplit(".", 1)[0] if "." in name else name)
        groups[key] = groups.get(key, 0) + 1
    shown = list(groups)[:8]
    more = f" and {len(groups) - 8} more" if len(groups) > 8 else ""
    return f"{', '.join(shown)}{more} ({len(names)} tensors)"


def plan_init(ours: Dict[str, torch.Size], src: NetworkSource) -> InitPlan:
    """Match the model's tensor shapes `ours` against the source's weights by name and shape."""
    plan = InitPlan(f"{src.path} ({src.kind} {src.model_name})")
    for name, shape in ours.items():
        theirs = src.state_dict.get(name)
        if theirs is None:
            plan.fresh.append(name)
        elif tuple(theirs.shape) != tuple(shape):
            plan.reshaped[name] = (tuple(theirs.shape), tuple(shape))
        else:
            plan.loaded.append(name)
    plan.unused = [k for k in src.state_dict if k not in ours]
    return plan


def read_source(cfg: TrainConfig) -> NetworkSource:
    """The init_from weights (EMA weights of a checkpoint); ConfigError in one line if unreadable."""
    try:
        return read_network(cfg.model.init_from)
    except CheckpointError as err:
        raise ConfigError(f"model.init_from: {err}") from None


def check_init_from_config(cfg: TrainConfig, world_size: int) -> InitPlan | None:
    """check_init_from for the model this config builds on its dataset (read from the manifest);
    None when the run will resume from its own checkpoint (init_from is ignored then, so a source
    deleted since, or a strict plan, must not block the resume)."""
    try:
        if resume_target(cfg, world_size):
            return None
    except RunStopped:
        pass  # the run will say why it cannot resume; the source is checked meanwhile
    if not os.path.exists(cfg.model.init_from):
        raise ConfigError(f"model.init_from: {cfg.model.init_from} does not exist")
    try:
        _, manifest = resolve_shards(cfg.data.shards, cfg.data.manifest)
    except (DataToolsError, OSError) as err:
        raise ConfigError(f"data.shards: {err}") from None
    return check_init_from(cfg, cfg.model_kwargs(manifest.spec.shape, manifest.num_classes))


def check_init_from(cfg: TrainConfig, model_kwargs: dict) -> InitPlan:
    """Before launch: read the source and match it against the model the config builds (on the meta
    device: no memory); ConfigError when it matches nothing, or anything short of exactly with
    model.init_strict."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_model(cfg.model.name, **model_kwargs).state_dict().items()}
    src = read_source(cfg)
    plan = plan_init(shapes, src)
    trained = src.diffusion.get("preconditioning")
    if trained and trained != cfg.diffusion.preconditioning:
        plan.notes.append(f"note: the source was trained with diffusion.preconditioning {trained}, this run uses "
                          f"{cfg.diffusion.preconditioning} (its outputs mean something else until retrained)")
    if not plan.loaded:
        raise ConfigError(f"model.init_from: no tensor of {plan.source} fits {cfg.model.name} (first of ours: "
                          f"{next(iter(shapes), 'none')})")
    if cfg.model.init_strict and not plan.exact:
        raise ConfigError(f"{plan.line()} (model.init_strict: the source must cover the model exactly)")
    return plan


@torch.no_grad()
def apply_init(net: nn.Module, src: NetworkSource) -> InitPlan:
    """Copy the source's matching tensors into `net` (whole tensors: before ZeRO-3 partitioning or
    inside GatheredParameters); the rest keep their fresh initialisation."""
    keys = set(net.state_dict())  # parameters and persistent buffers (not the rebuilt position tables)
    own = {k: t for k, t in (*net.named_parameters(), *net.named_buffers()) if k in keys}
    plan = plan_init({k: getattr(t, "ds_shape", t.shape) for k, t in own.items()}, src)
    for name in plan.loaded:
        own[name].data.copy_(src.state_dict[name].to(own[name].dtype))
    return plan
