"""Rehearsing failures: `MDT_FAULTS` makes a rank fail on purpose, so that a cluster's failure
handling (the launcher, the scheduler's requeue, the alerts) can be tried before a real run needs it.

    MDT_FAULTS="raise:call=9:rank=1"                 forward call 9 on rank 1 raises RuntimeError
    MDT_FAULTS="hang:call=9"                         forward call 9 never returns (every rank)
    MDT_FAULTS="nan:calls=7,25+:rank=1"              those forward calls' losses are NaN (25+: from 25 on)
    MDT_FAULTS="enospc:save=2"                       the 2nd checkpoint save fails as a full disk would
    MDT_FAULTS="nan:calls=7:rank=1;enospc:save=3"    several, separated by ';'

Forward calls count the training forward passes of this rank from 1 (one per micro-step; a step
tried again after a skipped update counts its calls again); saves count this process's checkpoint
saves from 1. Without `rank=` a fault applies on every rank. Nothing else changes: whatever the run does next is its own
behaviour. `mdt-train` arms the faults after validating its config and says so on each rank.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from typing import Callable, List

from deepspeed import DeepSpeedEngine

from ..console import say
from . import task

ENV = "MDT_FAULTS"
"""The environment variable that arms the faults."""

KINDS = {"raise": "call", "hang": "call", "nan": "calls", "enospc": "save"}
"""Fault kinds and the key that says when each strikes."""


class FaultSpecError(ValueError):
    """MDT_FAULTS does not parse; the message names the part."""


@dataclass(frozen=True)
class Fault:
    """One armed fault: its kind, when it strikes (`when` holds call or save numbers, `from_on`
    the first of an open range) and on which rank (None: every rank)."""

    kind: str
    when: frozenset
    from_on: int | None
    rank: int | None

    def strikes(self, count: int) -> bool:
        """Whether the fault strikes at this call or save number."""
        return count in self.when or (self.from_on is not None and count >= self.from_on)

    def describe(self) -> str:
        """The fault in words, for the armed line."""
        numbers = sorted(self.when) + ([f"{self.from_on}+"] if self.from_on is not None else [])
        where = f"{KINDS[self.kind]} {','.join(str(n) for n in numbers)}"
        return f"{self.kind} at {where}" + (f" on rank {self.rank}" if self.rank is not None else "")


def _numbers(value: str, part: str) -> tuple:
    fixed, tail = set(), None
    for item in filter(None, (v.strip() for v in value.split(","))):
        try:
            if item.endswith("+"):
                tail = int(item[:-1])
            else:
                fixed.add(int(item))
        except ValueError:
            raise FaultSpecError(f"{ENV}: {part!r}: {item!r} is not a number (or N+)") from None
    if not fixed and tail is None:
        raise FaultSpecError(f"{ENV}: {part!r}: no numbers")
    return frozenset(fixed), tail


def parse_faults(spec: str) -> List[Fault]:
    """The faults of an MDT_FAULTS value; FaultSpecError naming the part that does not parse."""
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        kind, *options = part.split(":")
        if kind not in KINDS:
            raise FaultSpecError(f"{ENV}: {part!r}: unknown kind {kind!r} (choose from {', '.join(KINDS)})")
        keys = {}
        for option in options:
            key, sep, value = option.partition("=")
            if not sep or key not in (KINDS[kind], "rank"):
                raise FaultSpecError(f"{ENV}: {part!r}: expected {KINDS[kind]}=N[,M...] and optionally rank=R, "
                                     f"got {option!r}")
            keys[key] = value
        if KINDS[kind] not in keys:
            raise FaultSpecError(f"{ENV}: {part!r}: say when with {KINDS[kind]}=N")
        when, from_on = _numbers(keys[KINDS[kind]], part)
        if kind in ("raise", "hang", "enospc") and (from_on is not None or len(when) != 1):
            raise FaultSpecError(f"{ENV}: {part!r}: {kind} strikes once: give one number")
        rank = None
        if "rank" in keys:
            try:
                rank = int(keys["rank"])
            except ValueError:
                raise FaultSpecError(f"{ENV}: {part!r}: rank must be a number, got {keys['rank']!r}") from None
        faults.append(Fault(kind, when, from_on, rank))
    return faults


def _patch_forward(act: Callable[[object, int], object]) -> None:
    original, calls = task.TrainingModule.forward, [0]

    def forward(self, *args, **kwargs):
        calls[0] += 1
        return act(lambda: original(self, *args, **kwargs), calls[0])

    task.TrainingModule.forward = forward


def _install(fault: Fault) -> None:
    if fault.kind == "nan":
        def nan(run, call):
            out = run()
            return out._replace(loss=out.loss * float("nan")) if fault.strikes(call) else out
        _patch_forward(nan)
    elif fault.kind == "raise":
        def fail(run, call):
            if fault.strikes(call):
                raise RuntimeError(f"injected fault ({ENV}) in forward call {call}")
            return run()
        _patch_forward(fail)
    elif fault.kind == "hang":
        def hang(run, call):
            while fault.strikes(call):
                time.sleep(3600)
            return run()
        _patch_forward(hang)
    else:  # enospc: part of the checkpoint is written, then the disk is "full"
        original, saves = DeepSpeedEngine.save_checkpoint, [0]

        def save_checkpoint(self, root, tag=None, **kwargs):
            saves[0] += 1
            if fault.strikes(saves[0]):
                os.makedirs(os.path.join(root, tag), exist_ok=True)
                with open(os.path.join(root, tag, "partial.pt"), "wb") as f:
                    f.write(b"\0" * 4096)
                raise OSError(errno.ENOSPC, f"No space left on device (injected by {ENV})")
            return original(self, root, tag=tag, **kwargs)

        DeepSpeedEngine.save_checkpoint = save_checkpoint


def arm_faults(rank: int, spec: str | None = None) -> List[Fault]:
    """Install the faults of `spec` (default: the MDT_FAULTS variable) that apply to `rank`, and
    say so on stdout; returns them. FaultSpecError when the value does not parse."""
    spec = os.environ.get(ENV, "") if spec is None else spec
    mine = [f for f in parse_faults(spec) if f.rank is None or f.rank == rank]
    for fault in mine:
        _install(fault)
    if mine:
        say(f"rank {rank}: {ENV} armed: {'; '.join(f.describe() for f in mine)}", every_rank=True)
    return mine
