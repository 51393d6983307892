"""What the trainer's commands print for people: one place that knows which rank speaks.

A multi-rank job would print every line once per rank; `say` prints on rank 0 only unless a line
is about this rank alone (`every_rank=True`: a rank's own disk, a rank's own failure). Lines are
flushed at once, so a log file shows them as they happen and in order with other ranks' output.
The rank comes from the process group when one is up, else from the launcher's RANK variable, so
lines printed before start-up (config errors) follow the same rule.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

import torch.distributed as dist


def this_rank() -> int:
    """This process's global rank: the process group's, else $RANK, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def say(message: str, *, every_rank: bool = False, file: TextIO | None = None) -> None:
    """Print one line (flushed) on rank 0, or on every rank with every_rank=True; `file` defaults
    to stdout."""
    if every_rank or this_rank() == 0:
        print(message, file=file or sys.stdout, flush=True)


def warn(message: str, *, every_rank: bool = False) -> None:
    """Print 'warning: MESSAGE' (stdout, flushed) on rank 0, or on every rank."""
    say(f"warning: {message}", every_rank=every_rank)


def error(message: str, *, every_rank: bool = False) -> None:
    """Print one error line to stderr (flushed) on rank 0, or on every rank."""
    say(message, every_rank=every_rank, file=sys.stderr)
