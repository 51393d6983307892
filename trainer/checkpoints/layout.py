"""Where checkpoints live and which one counts: tags, the COMPLETE marker, `latest`, the newest
complete checkpoint, rotation, and what kind of DeepSpeed files a checkpoint holds.

Layout of run_dir/checkpoints/:

    <tag>/                   DeepSpeed's files (model / optimizer shards of every rank)
    <tag>/ema.safetensors    the float32 EMA weights (rank 0)
    <tag>/trainer_state.json the checkpoint record (trainer.checkpoints.record)
    <tag>/data_rank<r>.json  each rank's data stream position
    <tag>/COMPLETE           written after every rank finished; only then is the tag eligible
    latest                   name of the newest complete tag (replaced atomically)
    <tag>_universal/         optional: the same state in DeepSpeed's universal layout
                             (trainer.checkpoints.universal); loads on any number of ranks. Not a tag.

Nothing here pickles code: DeepSpeed's own files hold tensors and plain containers, ours are JSON
and safetensors.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
from typing import List

from .record import CheckpointError

COMPLETE = "COMPLETE"
LATEST = "latest"
EMA_FILE = "ema.safetensors"
UNIVERSAL_SUFFIX = "_universal"
PARTIAL_SUFFIX = ".partial"
_UNIVERSAL_STATE = os.path.join("zero", "optimizer_state.pt")
_TAG = re.compile(r"^step(\d{8,})(?:-([a-z_]+))?$")


def make_tag(step: int, phase_end: str | None = None) -> str:
    """Checkpoint tag for the state after `step` optimizer steps; phase-end saves carry the phase."""
    return f"step{step:08d}" + (f"-{phase_end}" if phase_end else "")


def is_complete(checkpoint: str) -> bool:
    """Whether every rank finished writing this checkpoint."""
    return os.path.exists(os.path.join(checkpoint, COMPLETE))


def complete_tags(root: str) -> List[str]:
    """Complete checkpoint tags under root, oldest first (by step)."""
    if not os.path.isdir(root):
        return []
    tags = [t for t in os.listdir(root) if _TAG.match(t) and is_complete(os.path.join(root, t))]
    return sorted(tags, key=lambda t: (int(_TAG.match(t).group(1)), t))


def find_resume(root: str, resume: str) -> str | None:
    """The checkpoint directory to resume from: 'auto' (newest complete), 'none', or a path."""
    if resume == "none":
        return None
    if resume != "auto":
        if not is_complete(resume):
            raise CheckpointError(f"checkpoint.resume: {resume} is not a complete checkpoint (no {COMPLETE} file)")
        return resume
    latest = os.path.join(root, LATEST)
    if os.path.exists(latest):
        with open(latest) as f:
            tag = f.read().strip()
        if is_complete(os.path.join(root, tag)):
            return os.path.join(root, tag)
    tags = complete_tags(root)  # `latest` missing or stale: fall back to the newest complete tag
    return os.path.join(root, tags[-1]) if tags else None


RELEASE_SUFFIXES = (".pt", ".pth", ".ckpt")
"""File names of published releases (torch.save files: DiT, SiT, MaskDiT)."""


def resolve_checkpoint(path: str) -> str:
    """A complete checkpoint directory from a tag directory, a checkpoints root or a run directory
    (their newest complete checkpoint), or a file (an export or a release) as it is."""
    if os.path.isfile(path):
        if not path.endswith((".safetensors", *RELEASE_SUFFIXES)):
            raise CheckpointError(f"checkpoint {path}: expected a checkpoint directory, an exported .safetensors "
                                  f"file or a published release ({', '.join(RELEASE_SUFFIXES)})")
        return path
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if is_complete(path):
        return path
    if os.path.exists(os.path.join(path, EMA_FILE)):
        raise CheckpointError(f"checkpoint {path} is incomplete (no {COMPLETE} file): its save did not finish")
    root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    found = find_resume(root, "auto")
    if found is None:
        raise CheckpointError(f"checkpoint {path}: no complete checkpoint found under {root}")
    return found


def rotate(root: str, keep_last: int, keep_phase_ends: bool) -> List[str]:
    """Delete old complete periodic checkpoints beyond the newest keep_last; returns deleted tags.

    Incomplete tag directories older than the newest complete one are partial saves: removed too.
    A deleted tag's universal copy goes with it, and so do half-written universal copies
    (<tag>_universal.partial, left by an interrupted `mdt-universal`) of tags that are gone.
    """
    tags = complete_tags(root)
    periodic = [t for t in tags if not (keep_phase_ends and _TAG.match(t).group(2))]
    doomed = periodic[:-keep_last] if keep_last else periodic
    if tags:
        newest = int(_TAG.match(tags[-1]).group(1))
        for t in os.listdir(root):
            m = _TAG.match(t)
            if m and t not in tags and int(m.group(1)) < newest:
                doomed.append(t)
    for t in doomed:
        shutil.rmtree(os.path.join(root, t), ignore_errors=True)
        shutil.rmtree(os.path.join(root, t + UNIVERSAL_SUFFIX), ignore_errors=True)
        shutil.rmtree(os.path.join(root, t + UNIVERSAL_SUFFIX + PARTIAL_SUFFIX), ignore_errors=True)
    suffix = UNIVERSAL_SUFFIX + PARTIAL_SUFFIX
    for name in os.listdir(root):  # orphans: their tag was deleted before
        if name.endswith(suffix) and _TAG.match(name[:-len(suffix)]) and \
                not os.path.exists(os.path.join(root, name[:-len(suffix)])):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return doomed


def is_universal(path: str) -> bool:
    """True for a checkpoint in DeepSpeed's universal layout (loads on any number of ranks)."""
    return os.path.isfile(os.path.join(path, _UNIVERSAL_STATE))


def is_partitioned(path: str) -> bool:
    """True when DeepSpeed split the optimizer state per rank (ZeRO-1/2/3): such a checkpoint loads
    only on the world size that wrote it. ZeRO-0 keeps it whole and loads on any world size."""
    return bool(glob.glob(os.path.join(path, "*_optim_states.pt")))
