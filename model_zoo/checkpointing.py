"""Per-block activation checkpointing with three interchangeable implementations.

- "torch": torch.utils.checkpoint with use_reentrant=False (default; safe with any inputs).
- "deepspeed": deepspeed.checkpointing.checkpoint (reentrant) with DeepSpeed's defaults. Its
  activation_checkpointing options stay off: partition_activations splits checkpoints over
  model-parallel ranks (this trainer has data parallelism only), and cpu_checkpointing empties
  every input tensor it was handed (`arg.data = torch.empty([])`, DeepSpeed 0.19), which breaks
  blocks whose conditioning c is shared by every block and whose x may feed a long skip: tried
  through deepspeed.checkpointing.configure, the second block received an empty c. For CPU
  offload use "fairscale".
- "fairscale": fairscale's checkpoint_wrapper patched onto each block, optionally offloading the
  block inputs to CPU.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

CHECKPOINT_MODES = ("none", "torch", "deepspeed", "fairscale")


def validate_mode(mode: str, offload: bool) -> None:
    """Raise a one-line error for an unknown mode or an offload request it cannot honour."""
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is not one of {', '.join(CHECKPOINT_MODES)}")
    if offload and mode != "fairscale":
        raise ValueError(f"activation offload to CPU needs mode 'fairscale', got {mode!r}")


def wrap_blocks(blocks: Iterable[nn.Module], mode: str, offload: bool) -> None:
    """Install (mode 'fairscale') or remove (any other mode) fairscale's forward patch in place.

    The patch lives on the instance's forward attribute, so parameter names and state dicts are
    unchanged and the mode can be switched back and forth.
    """
    for block in blocks:
        if "forward" in block.__dict__:
            del block.forward
        if mode == "fairscale":
            # optional implementations are imported when chosen: model_zoo stays importable without them
            from fairscale.nn.checkpoint import checkpoint_wrapper  # noqa: PLC0415

            checkpoint_wrapper(block, offload_to_cpu=offload)


_warned_reentrant = False


def run_block(block: nn.Module, mode: str, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Call block(x, c), recomputing its activations in backward according to mode."""
    global _warned_reentrant
    if mode in ("none", "fairscale") or not torch.is_grad_enabled():
        return block(x, c)
    if mode == "torch":
        return torch_checkpoint(block, x, c, use_reentrant=False)
    # DeepSpeed's checkpoint is reentrant: when no input needs grad its outputs silently carry no
    # grad and the block's weights would never learn, so run that block without checkpointing.
    if not (x.requires_grad or c.requires_grad):
        if not _warned_reentrant:
            warnings.warn("deepspeed checkpointing skipped for a block whose inputs need no grad")
            _warned_reentrant = True
        return block(x, c)
    import deepspeed  # noqa: PLC0415 - heavy; only this mode needs it

    return deepspeed.checkpointing.checkpoint(block, x, c)
