"""Saving and restoring a training run: when a checkpoint is due, writing one on every rank (the
record and EMA from rank 0, COMPLETE last), rotation, and resuming from the latest one (weights
checked against the saved checksums, the data stream placed where it was, or rescaled for a new
world size)."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
from typing import Any, Callable, Dict, List, Tuple

import torch
from deepspeed import DeepSpeedEngine
from safetensors.torch import load_file, save_file

from data_tools.atomic import write_text_atomic

from ..checkpoints import (
    COMPLETE,
    EMA_FILE,
    LATEST,
    PARTIAL_SUFFIX,
    UNIVERSAL_SUFFIX,
    CheckpointError,
    CheckpointRecord,
    RunState,
    complete_tags,
    find_resume,
    for_world_size,
    is_universal,
    make_tag,
    read_record,
    rotate,
    write_record,
)
from ..config import TrainConfig
from ..console import say, warn
from ..distributed import barrier
from .data import LatentLoader
from .ema import EMA
from .engine import replica_checksums
from .run_control import StepEnd
from .stop import RunStopped

FREE_SPACE_MARGIN = 1.5
"""Warn before a save when the checkpoint disk has less free space than this many times the size
of the last checkpoint (the new one is written before rotation removes an old one)."""

_NEARLY_FULL = 1 << 20  # bytes: a disk with less free space than this counts as full


class SaveFailed(RunStopped):
    """A checkpoint could not be written because of its storage (full, over quota, read-only,
    gone); the half-written checkpoint was removed where possible and `latest` still names the last
    complete one. Exit status 3, like every stop that a rerun would meet again."""

    every_rank = True  # a node's own disk may fail it alone


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:,.1f} MiB"


def checkpoint_bytes(path: str) -> int:
    """The size of a checkpoint directory's files (for the free-space check)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def storage_problem(err: BaseException, root: str, last_bytes: int | None = None) -> str | None:
    """Why a save into `root` failed when its storage is the cause (full, over quota, read-only or
    vanished), in words for one line; None when storage looks fine (then the error is something
    else). Torch's writers report a full disk as RuntimeErrors without an errno, so free space
    decides there."""
    code = getattr(err, "errno", None)
    said = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    if not os.path.isdir(root):
        return f"the checkpoint directory {root} is gone ({said})"
    try:
        free: int | None = shutil.disk_usage(root).free
    except OSError:
        free = None
    last = f", the last checkpoint took {_mib(last_bytes)}" if last_bytes else ""
    full = free is not None and (free < _NEARLY_FULL or (last_bytes is not None and free < last_bytes))
    if code in (errno.ENOSPC, errno.EDQUOT) or full:
        what = "over its quota" if code == errno.EDQUOT else "full"
        space = f"{_mib(free)} free" if free is not None else "free space unknown"
        return f"the disk of {root} is {what}: {space}{last} ({said})"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM) or not os.access(root, os.W_OK):
        return f"{root} is read-only or not writable ({said})"
    return None


def low_space_warning(root: str, last_bytes: int | None, margin: float = FREE_SPACE_MARGIN) -> str | None:
    """A warning when `root`'s disk has less than margin x the last checkpoint's size free."""
    if not last_bytes:
        return None
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return None
    if free >= margin * last_bytes:
        return None
    return (f"warning: {_mib(free)} free on the disk of {root}, the last checkpoint took {_mib(last_bytes)}: "
            "the next save may not fit (this warning is given once)")


def save_checkpoint(engine: DeepSpeedEngine, ema: EMA, root: str, tag: str, record: CheckpointRecord,
                    data_state: Dict[str, Any], rank: int, sync: Callable[[], None] = barrier,
                    last_bytes: int | None = None) -> str:
    """Write a checkpoint; must be called on every rank. Returns the checkpoint directory.

    Order: the EMA gathered to rank 0 (sharded under ZeRO-3), DeepSpeed's shards and each rank's
    data position, then (rank 0) the EMA file and the record, then COMPLETE and `latest`: a
    checkpoint without COMPLETE is never resumed from. A write that
    fails for want of storage raises SaveFailed naming the directory, the OS error and (full disk)
    the free space and `last_bytes`, the last checkpoint's size, after removing the partial tag.
    """
    path = os.path.join(root, tag)
    if rank == 0:
        if os.path.exists(path):
            shutil.rmtree(path)  # a leftover of the same tag: a partial save, or a run resumed from an older one
        for stale in (path + UNIVERSAL_SUFFIX, path + UNIVERSAL_SUFFIX + PARTIAL_SUFFIX):
            shutil.rmtree(stale, ignore_errors=True)  # made from the old <tag>, no longer its state
    sync()
    ema_state = ema.state_for_saving(rank)  # every rank: a sharded EMA is gathered to rank 0
    try:
        engine.save_checkpoint(root, tag=tag, save_latest=False)
        os.makedirs(path, exist_ok=True)
        write_text_atomic(os.path.join(path, f"data_rank{rank}.json"), json.dumps(data_state))
        if rank == 0:
            save_file({k: v.contiguous() for k, v in ema_state.items()}, os.path.join(path, EMA_FILE))
            write_record(path, record)
    except (OSError, RuntimeError) as err:
        why = storage_problem(err, root, last_bytes)
        if why is None:
            raise
        shutil.rmtree(path, ignore_errors=True)  # never COMPLETE: removing it frees the space it took
        raise SaveFailed(f"saving checkpoint {path} failed: {why}; `latest` still names the last complete "
                         "checkpoint: make room and rerun the same command to resume from it") from None
    sync()
    if rank == 0:
        write_text_atomic(os.path.join(path, COMPLETE), "")
        write_text_atomic(os.path.join(root, LATEST), tag)
    sync()
    return path


def load_checkpoint(engine: DeepSpeedEngine, ema: EMA, path: str, rank: int
                    ) -> Tuple[CheckpointRecord, Dict[str, Any] | None]:
    """Restore engine (model + optimizer) and EMA; returns the record and this rank's data position."""
    root, tag = os.path.split(os.path.normpath(path))
    # The engine's config says once, at build time, whether it loads universal checkpoints; a run
    # resumed from a universal copy and later rolled back to its own checkpoint needs the other way.
    config = getattr(engine, "_config", None)
    if config is not None:
        config.load_universal_checkpoint = is_universal(path)
    load_path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {path}")
    record = read_record(path)
    ema.load_state_dict(load_file(os.path.join(path, EMA_FILE)), updates=record.ema_updates)
    data_file = os.path.join(path, f"data_rank{rank}.json")
    data = None
    if os.path.exists(data_file):
        with open(data_file) as f:
            data = json.load(f)
    return record, data


def optimizer_state_summary(optimizer: object) -> str:
    """What the optimizer holds, for the resume line: 'Adam step N' (the largest step count in its
    state) or 'fresh' (no state yet). Follows `.optimizer` from DeepSpeed's wrapper (ZeRO 1-3, the
    bf16 optimizer) to the innermost torch optimizer; ZeRO-0 without one is that optimizer."""
    inner, opt, seen = None, optimizer, set()
    while opt is not None and id(opt) not in seen:
        seen.add(id(opt))
        if isinstance(opt, torch.optim.Optimizer):
            inner = opt
        opt = getattr(opt, "optimizer", None)
    if inner is None or not inner.state:
        return "fresh"
    steps = [s["step"] for s in inner.state.values() if isinstance(s, dict) and "step" in s]
    steps += [g["step"] for g in inner.param_groups if "step" in g]  # optimizers that count per group
    if not steps:
        return "loaded (no step count)"
    return f"Adam step {max(int(float(s)) for s in steps)}"


# ----------------------------------------------------------------------------- data positions


def data_states(path: str, world_size: int) -> List[Dict[str, Any]]:
    """The data stream positions saved by each of world_size ranks."""
    out = []
    for r in range(world_size):
        with open(os.path.join(path, f"data_rank{r}.json")) as f:
            out.append(json.load(f))
    return out


def rescale_data_state(saved: List[Dict[str, Any]], saved_micro_batch: int, rank: int, world_size: int,
                       micro_batch: int, steps_per_epoch: int) -> Dict[str, Any]:
    """Data stream position for `rank` of `world_size` ranks from the positions saved by
    len(saved) ranks (each with micro batches of saved_micro_batch samples).

    A rank's stream depends on its rank and the world size, so saved positions do not carry over.
    The new stream starts in the saved epoch after the same number of that epoch's samples (over all
    ranks), rounded down to whole micro batches of the new world: deterministic for the new world
    size. The rest of that epoch is drawn afresh (a sample of it may repeat or be left out); later
    epochs are whole. skipped: each rank keeps its own count (0 for new ranks).
    """
    epoch, done = int(saved[0]["epoch"]), int(saved[0]["batches_in_epoch"])  # the same on every rank
    batches = done * len(saved) * saved_micro_batch // (world_size * micro_batch)
    if batches >= steps_per_epoch:
        epoch, batches = epoch + 1, 0
    return dict(samples_seen=sum(int(s["samples_seen"]) for s in saved) // world_size, epoch=epoch,
                batches_in_epoch=batches, skipped=int(saved[rank].get("skipped", 0)) if rank < len(saved) else 0)


def resume_data_state(record: CheckpointRecord, data: Dict[str, Any] | None, path: str, rank: int,
                      world_size: int, micro_batch: int, steps_per_epoch: int
                      ) -> Tuple[Dict[str, Any] | None, bool]:
    """(this rank's data stream position, whether it was rescaled) for resuming from checkpoint
    `path` with its record and this rank's saved position `data`.

    The saved position counts micro batches of the saved world: it is used as it is only when
    (world size, micro batch size) is the saved pair, else `rescale_data_state` converts it. A
    record without the micro batch size counts as written with this run's.
    """
    saved_micro = record.micro_batch_size()
    saved_micro = micro_batch if saved_micro is None else saved_micro
    if (record.world_size, saved_micro) == (world_size, micro_batch):
        return data, False
    return rescale_data_state(data_states(path, record.world_size), saved_micro, rank, world_size, micro_batch,
                              steps_per_epoch), True


# ----------------------------------------------------------------------------- the run's checkpointer


def checkpoint_before(root: str, step: int, world_size: int) -> str | None:
    """The newest complete checkpoint under `root` saved after fewer than `step` (1-based) steps,
    as world_size ranks load it (its universal copy when the world size changed), or None;
    RunStopped with the reason when it cannot be used."""
    try:
        for tag in reversed(complete_tags(root)):
            path = os.path.join(root, tag)
            if read_record(path).step < step:
                return for_world_size(path, world_size)
    except CheckpointError as err:
        raise RunStopped(str(err)) from None
    return None


def resume_target(cfg: TrainConfig, world_size: int) -> str | None:
    """The checkpoint this run resumes from (checkpoint.resume; the universal copy when the world
    size changed), or None; RunStopped with the reason when it cannot be used."""
    root = os.path.join(cfg.run.run_dir(), "checkpoints")
    try:
        found = find_resume(root, cfg.checkpoint.resume)
        return found and for_world_size(found, world_size)
    except CheckpointError as err:
        raise RunStopped(str(err)) from None


class Checkpointer:
    """A run's checkpoints: `due` says when, `save` writes (all ranks), `resume` restores."""

    def __init__(self, cfg: TrainConfig, engine: DeepSpeedEngine, ema: EMA, loader: LatentLoader, rank: int,
                 world_size: int, model_kwargs: Dict[str, Any], dataset: Dict[str, Any]):
        self.cfg, self.engine, self.ema, self.loader = cfg, engine, ema, loader
        self.rank, self.world_size = rank, world_size
        self.model_kwargs, self.dataset = model_kwargs, dataset
        self.root = os.path.join(cfg.run.run_dir(), "checkpoints")
        self.last_bytes: int | None = None  # the last checkpoint's size (rank 0), for the free-space check
        self._warned_space = False

    def due(self, end: StepEnd) -> bool:
        """Whether to save after the step just finished: every checkpoint.every steps, at the end of
        an unmask-tuning phase, at the last step, and when a stop or a rollback asks for a save."""
        return end.phase.phase_end or end.step % self.cfg.checkpoint.every == 0 or end.last or end.save_now

    def save(self, state: RunState, phase_end: str | None) -> str:
        """Save the run after `state.step` steps (every rank), then rotate old checkpoints (rank 0)."""
        sums = replica_checksums(self.engine.module.net)  # collective: every rank takes part
        if any(abs(a - b) > 1e-9 * max(1.0, abs(b)) for s in sums for a, b in zip(s, sums[0])):
            warn(f"data-parallel replicas hold different weights at step {state.step}: {sums}")
        record = CheckpointRecord(
            state=dataclasses.replace(state), world_size=self.world_size, model_name=self.cfg.model.name,
            model_kwargs=self.model_kwargs,
            config=self.cfg.to_dict(), dataset=self.dataset, ema_updates=self.ema.updates, replica_checksums=sums,
            phase_end=phase_end)
        if self.rank == 0 and not self._warned_space:
            warning = low_space_warning(self.root, self.last_bytes)
            if warning:
                say(warning)
                self._warned_space = True
        path = save_checkpoint(self.engine, self.ema, self.root, make_tag(state.step, phase_end), record,
                               self.loader.state_dict(), self.rank, last_bytes=self.last_bytes)
        if self.rank == 0:
            self.last_bytes = checkpoint_bytes(path)
            rotate(self.root, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_phase_ends)
            say(f"saved checkpoint {path}")
        return path

    def latest_before(self, step: int) -> str | None:
        """Where a rollback goes when the trouble began in `step`: see checkpoint_before."""
        return checkpoint_before(self.root, step, self.world_size)

    def _load_checked(self, path: str) -> Tuple[CheckpointRecord, Dict[str, Any] | None, bool]:
        """Load a checkpoint on every rank and check the weights against the saved checksums:
        (record, this rank's data position, whether checksums were there to check)."""
        try:
            record, data = load_checkpoint(self.engine, self.ema, path, self.rank)
        except CheckpointError as err:
            raise RunStopped(str(err)) from None
        sums = replica_checksums(self.engine.module.net)  # collective: every rank takes part
        want = (record.replica_checksums or [None])[0]
        if want and any(abs(a - b) > 1e-6 * max(1.0, abs(b)) for s in sums for a, b in zip(s, want)):
            raise RunStopped(f"weights loaded from {path} differ from the saved ones (checksums {sums} vs {want})")
        return record, data, bool(want)

    def reload(self, path: str) -> RunState:
        """Load a checkpoint's weights, optimizer and EMA for a rollback; the data stream stays where
        it is (the data since the checkpoint are skipped). The counters are the checkpoint's."""
        record, _, _ = self._load_checked(path)
        return record.state

    def resume(self, path: str) -> RunState:
        """Load a checkpoint, check that the weights are the saved ones, place the data stream."""
        record, data, want = self._load_checked(path)
        micro = self.cfg.data.micro_batch_size
        data, rescaled = resume_data_state(record, data, path, self.rank, self.world_size, micro, len(self.loader))
        if rescaled:
            was_micro = record.micro_batch_size() or micro
            was, now = f"a world of {record.world_size}", f"{self.world_size}"
            if was_micro != micro:
                was, now = f"{was} with micro batches of {was_micro}", f"{now} with micro batches of {micro}"
            warn(f"{path} was written by {was}, this run has {now}: the data stream restarts as drawn for "
                 f"{self.world_size} at epoch {data['epoch']}, batch {data['batches_in_epoch']} (the same share of the "
                 "epoch; the rest of this epoch is drawn afresh)")
        if data:
            self.loader.load_state_dict(data)
        if self.rank == 0:
            self.last_bytes = checkpoint_bytes(path)
            checked = " (weights match the saved checksums)" if want else ""
            say(f"resumed from {path} at step {record.step}{checked}, optimizer state: "
                f"{optimizer_state_summary(self.engine.optimizer)}")
        return record.state
