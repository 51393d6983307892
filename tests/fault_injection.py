"""`mdt-train` with faults injected, run by the deepspeed launcher in tests as `--module fault_injection`.

MDT_TEST_NAN_CALLS makes the loss of chosen training forward calls on one rank non-finite, as a
bad batch or an overflow would: a comma-separated list of 1-based call numbers, where `N+` means
call N and every later one. MDT_TEST_NAN_RANK (default 1) names the rank. Nothing else changes, so
whatever the run does with the bad loss is the trainer's own behaviour.

MDT_TEST_RAISE_CALL=N makes training forward call N on rank MDT_TEST_RAISE_RANK (default 1) raise
a RuntimeError, as an out-of-memory error or a bug would, while the data workers are alive.

MDT_TEST_SAVE_ENOSPC=N makes the N-th checkpoint save fail on every rank as a full disk would:
DeepSpeed's writer raises OSError(ENOSPC) after writing part of the checkpoint.
"""

from __future__ import annotations

import errno
import os
import sys

from deepspeed import DeepSpeedEngine

from trainer.cli import main
from trainer.training import task


def _wanted(spec: str):
    fixed, tail = set(), None
    for item in filter(None, (part.strip() for part in spec.split(","))):
        if item.endswith("+"):
            tail = int(item[:-1])
        else:
            fixed.add(int(item))
    return lambda call: call in fixed or (tail is not None and call >= tail)


def install_nan_losses(spec: str, rank: int) -> None:
    """Patch the training module's forward so the chosen calls on `rank` return NaN losses."""
    if int(os.environ.get("RANK", "0")) != rank:
        return
    wanted, original, calls = _wanted(spec), task.TrainingModule.forward, [0]

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls[0] += 1
        if wanted(calls[0]):
            out = out._replace(loss=out.loss * float("nan"))
        return out

    task.TrainingModule.forward = forward


def install_raise(call: int, rank: int) -> None:
    """Patch the training module's forward so that call number `call` on `rank` raises."""
    if int(os.environ.get("RANK", "0")) != rank:
        return
    original, calls = task.TrainingModule.forward, [0]

    def forward(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise RuntimeError(f"injected fault in forward call {call}")
        return original(self, *args, **kwargs)

    task.TrainingModule.forward = forward


def install_full_disk(save: int) -> None:
    """Patch DeepSpeed's checkpoint writer so that save number `save` fails with ENOSPC midway."""
    original, calls = DeepSpeedEngine.save_checkpoint, [0]

    def save_checkpoint(self, root, tag=None, **kwargs):
        calls[0] += 1
        if calls[0] == save:
            os.makedirs(os.path.join(root, tag), exist_ok=True)
            with open(os.path.join(root, tag, "partial.pt"), "wb") as f:
                f.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, root, tag=tag, **kwargs)

    DeepSpeedEngine.save_checkpoint = save_checkpoint


if __name__ == "__main__":
    if os.environ.get("MDT_TEST_SAVE_ENOSPC"):
        install_full_disk(int(os.environ["MDT_TEST_SAVE_ENOSPC"]))
    if os.environ.get("MDT_TEST_RAISE_CALL"):
        install_raise(int(os.environ["MDT_TEST_RAISE_CALL"]), int(os.environ.get("MDT_TEST_RAISE_RANK", "1")))
    if os.environ.get("MDT_TEST_NAN_CALLS"):
        install_nan_losses(os.environ["MDT_TEST_NAN_CALLS"], int(os.environ.get("MDT_TEST_NAN_RANK", "1")))
    sys.exit(main())
