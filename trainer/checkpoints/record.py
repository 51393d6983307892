"""The checkpoint record: what a checkpoint says about itself, one typed dataclass written as JSON
(`trainer_state.json`) and read by one function (`read_record`) that resume, export, universal
conversion and sampling all use."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List

from data_tools.atomic import write_text_atomic

STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 4
"""Version of the record's layout: 1, the fields every checkpoint had before the version was
recorded (such files read as version 1); 2 adds train_flops and train_seconds (0 when read from
version 1); 3 adds rollbacks and lr_cut_until (0 when read from older ones); 4 holds the run's
counters as one object, `state` (older files keep them at the top level and read the same). A
newer version than this is refused with a one-line error."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the one-line message says why and what to do."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """The checkpoint asked for does not exist or is incomplete."""


@dataclass
class RunState:
    """The run's counters: what the training loop advances every step and a checkpoint carries."""

    step: int = 0
    """Optimizer steps done."""
    images_seen: int = 0
    """Images trained on, over all ranks."""
    nonfinite_skipped: int = 0
    """Updates skipped for non-finite gradients (each step tried again with new data)."""
    train_flops: float = 0.0
    """Training FLOPs spent so far, all ranks (forward + backward, at each step's mask ratio)."""
    train_seconds: float = 0.0
    """Training wall time so far, evaluation and checkpoint saves excluded."""
    rollbacks: int = 0
    """Rollbacks the run made after a divergence (monitor.on_nonfinite: rollback)."""
    lr_cut_until: int = 0
    """The last step trained at the lowered learning rate of the latest rollback (0: none)."""


_STATE_FIELDS = [f.name for f in dataclasses.fields(RunState)]


@dataclass
class CheckpointRecord:
    """The trainer's own state in a checkpoint (DeepSpeed's files hold the weights and optimizer)."""

    state: RunState
    """The run's counters when the checkpoint was saved."""
    world_size: int
    """Ranks that wrote the checkpoint (its ZeRO partitions are per rank)."""
    model_name: str
    """Registry name of the network (model_zoo.registry)."""
    model_kwargs: Dict[str, Any]
    """Constructor arguments of the network, data-derived sizes included."""
    config: Dict[str, Any]
    """The launch config the run trained with (TrainConfig.to_dict())."""
    dataset: Dict[str, Any] = field(default_factory=dict)
    """What sampling needs to know about the data: latent_shape, num_classes, scaling_factor,
    encoder, resolution, class_names (empty in checkpoints written before it was recorded)."""
    ema_updates: int = 0
    """EMA updates so far (they drive the EMA's decay warm-up)."""
    replica_checksums: List[List[float]] = field(default_factory=list)
    """[sum, sum of squares] of the weights per rank at save time; resume checks the loaded ones."""
    phase_end: str | None = None
    """The unmask-tuning phase this checkpoint ends, if any (such checkpoints are kept)."""
    universal_from: str | None = None
    """For a universal copy (mdt-universal): the checkpoint it was made from."""
    format_version: int = FORMAT_VERSION
    """Layout version of this record."""

    @property
    def step(self) -> int:
        """The optimizer steps done when the checkpoint was saved (state.step)."""
        return self.state.step

    def micro_batch_size(self) -> int | None:
        """data.micro_batch_size of the run that wrote it, if recorded."""
        value = (self.config.get("data") or {}).get("micro_batch_size")
        return None if value is None else int(value)

    def to_json(self) -> str:
        """The record as the JSON text of trainer_state.json, in this version's layout (a record read
        from an older file is written as the current version)."""
        return json.dumps({**dataclasses.asdict(self), "format_version": FORMAT_VERSION}, indent=1, default=str)


_FIELDS = {f.name: f for f in dataclasses.fields(CheckpointRecord)}
_REQUIRED = [name for name, f in _FIELDS.items()
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
_STATE_REQUIRED = ["step", "images_seen"]


def _record_from_dict(data: Dict[str, Any], where: str) -> CheckpointRecord:
    """Check a parsed trainer_state.json and build the record; `where` names it in errors."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{where} does not hold a JSON object")
    version = data.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise CheckpointError(f"{where} has checkpoint format version {version!r}; this trainer reads versions "
                              f"1 to {FORMAT_VERSION}: use the version of the trainer that wrote it (or a newer one)")
    if version < 4 and "state" not in data:  # the counters sat at the top level
        counters = {name: data[name] for name in _STATE_FIELDS if name in data}
        data = {**{k: v for k, v in data.items() if k not in counters}, "state": counters}
    state = data.get("state")
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: 'state' is not an object of the run's counters")
    missing = [name for name in _STATE_REQUIRED if name not in state]
    missing += [name for name in _REQUIRED if name not in data]
    unknown = sorted(set(data) - set(_FIELDS)) + sorted(f"state.{k}" for k in set(state) - set(_STATE_FIELDS))
    if missing or unknown:
        what = f"lacks {', '.join(missing)}" if missing else f"has unknown fields {', '.join(unknown)}"
        raise CheckpointError(f"{where} {what}: not a checkpoint record of format version {version}")
    if data.get("dataset") is None:  # early checkpoints wrote null or nothing
        data = {**data, "dataset": {}}
    return CheckpointRecord(**{**data, "state": RunState(**state), "format_version": version})


def read_record(checkpoint: str) -> CheckpointRecord:
    """The record of a checkpoint directory."""
    path = os.path.join(checkpoint, STATE_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{checkpoint} is not a checkpoint of this trainer (no {STATE_FILE})")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    return _record_from_dict(data, path)


def write_record(checkpoint: str, record: CheckpointRecord) -> None:
    """Write the record into a checkpoint directory atomically."""
    write_text_atomic(os.path.join(checkpoint, STATE_FILE), record.to_json())
