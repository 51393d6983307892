"""Checkpoints: save on all ranks, mark complete last, resume from the latest complete one, rotate,
and export weights to one safetensors file usable without DeepSpeed.

Layout of run_dir/checkpoints/:

    <tag>/                  DeepSpeed's files (model / optimizer shards of every rank)
    <tag>/ema.safetensors   the float32 EMA weights (rank 0)
    <tag>/trainer_state.json step, images seen, phase, counters, config, EMA update count
    <tag>/data_rank<r>.json each rank's data stream position
    <tag>/COMPLETE          written after every rank finished; only then is the tag eligible
    latest                  name of the newest complete tag (replaced atomically)

Nothing here pickles code: DeepSpeed's own files hold tensors and plain containers, ours are JSON
and safetensors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Dict, List, Optional, Tuple

import torch

COMPLETE = "COMPLETE"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
_TAG = re.compile(r"^step(\d{8,})(?:-([a-z_]+))?$")


def make_tag(step: int, phase_end: Optional[str] = None) -> str:
    """Checkpoint tag for the state after `step` optimizer steps; phase-end saves carry the phase."""
    return f"step{step:08d}" + (f"-{phase_end}" if phase_end else "")


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_tags(root: str) -> List[str]:
    """Complete checkpoint tags under root, oldest first (by step)."""
    if not os.path.isdir(root):
        return []
    tags = [t for t in os.listdir(root) if _TAG.match(t) and os.path.exists(os.path.join(root, t, COMPLETE))]
    return sorted(tags, key=lambda t: (int(_TAG.match(t).group(1)), t))


def find_resume(root: str, resume: str) -> Optional[str]:
    """The checkpoint directory to resume from: 'auto' (newest complete), 'none', or a path."""
    if resume == "none":
        return None
    if resume != "auto":
        if not os.path.exists(os.path.join(resume, COMPLETE)):
            raise FileNotFoundError(f"checkpoint.resume: {resume} is not a complete checkpoint (no {COMPLETE} file)")
        return resume
    latest = os.path.join(root, LATEST)
    if os.path.exists(latest):
        tag = open(latest).read().strip()
        if os.path.exists(os.path.join(root, tag, COMPLETE)):
            return os.path.join(root, tag)
    tags = complete_tags(root)  # `latest` missing or stale: fall back to the newest complete tag
    return os.path.join(root, tags[-1]) if tags else None


def save(engine, ema, root: str, tag: str, state: Dict[str, Any], data_state: Dict[str, Any], rank: int,
         barrier) -> str:
    """Save a checkpoint; must be called on every rank. Returns the checkpoint directory."""
    from safetensors.torch import save_file

    path = os.path.join(root, tag)
    if rank == 0 and os.path.exists(path):
        shutil.rmtree(path)  # a leftover partial save of the same tag (crash during an earlier save)
    barrier()
    engine.save_checkpoint(root, tag=tag, save_latest=False)
    os.makedirs(path, exist_ok=True)
    _write_atomic(os.path.join(path, f"data_rank{rank}.json"), json.dumps(data_state))
    if rank == 0:
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, os.path.join(path, EMA_FILE))
        _write_atomic(os.path.join(path, STATE_FILE), json.dumps(state, indent=1, default=str))
    barrier()
    if rank == 0:
        _write_atomic(os.path.join(path, COMPLETE), "")
        _write_atomic(os.path.join(root, LATEST), tag)
    barrier()
    return path


def rotate(root: str, keep_last: int, keep_phase_ends: bool) -> List[str]:
    """Delete old complete periodic checkpoints beyond the newest keep_last; returns deleted tags.

    Incomplete tag directories older than the newest complete one are partial saves: removed too.
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
    return doomed


def load(engine, ema, path: str, rank: int) -> Dict[str, Any]:
    """Restore engine (model + optimizer), EMA, and return the trainer state plus this rank's data state."""
    from safetensors.torch import load_file

    root, tag = os.path.split(os.path.normpath(path))
    load_path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
    with open(os.path.join(path, STATE_FILE)) as f:
        state = json.load(f)
    ema.load_state_dict(load_file(os.path.join(path, EMA_FILE)), updates=int(state.get("ema_updates", 0)))
    data_file = os.path.join(path, f"data_rank{rank}.json")
    state["data"] = json.load(open(data_file)) if os.path.exists(data_file) else None
    return state


def checkpoint_weights(checkpoint: str, which: str = "ema") -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(network state dict in float32, trainer state) of a complete checkpoint.

    which='ema': the saved average; 'model': the live weights consolidated from the ZeRO shards
    through DeepSpeed's API (works for every stage, no process group needed).
    """
    from safetensors.torch import load_file

    with open(os.path.join(checkpoint, STATE_FILE)) as f:
        state = json.load(f)
    if which == "ema":
        return load_file(os.path.join(checkpoint, EMA_FILE)), state
    if which != "model":
        raise ValueError(f"weights must be 'ema' or 'model', got {which!r}")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root, tag = os.path.split(os.path.normpath(checkpoint))
    full = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    prefix = "denoiser.net."
    return {k[len(prefix):]: v.float().contiguous() for k, v in full.items() if k.startswith(prefix)}, state


def export_weights(checkpoint: str, out_path: str, which: str = "ema") -> Dict[str, str]:
    """Write one safetensors file of network weights (EMA or live model) with metadata to rebuild it.

    The live weights come through DeepSpeed's consolidation API, so ZeRO-1/2/3 checkpoints work
    without a process group. Metadata: model name and constructor kwargs (JSON), step, which.
    """
    from safetensors.torch import save_file

    weights, state = checkpoint_weights(checkpoint, which)
    meta = {"model": state["model_name"], "model_kwargs": json.dumps(state["model_kwargs"]),
            "step": str(state["step"]), "weights": which,
            "diffusion": json.dumps(state["config"]["diffusion"]), "dataset": json.dumps(state.get("dataset", {}))}
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    save_file(weights, out_path, metadata=meta)
    return meta


def load_exported(path: str, device: str | torch.device = "cpu"):
    """Rebuild the network from an exported safetensors file (no DeepSpeed needed)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from model_zoo.registry import build_model

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    net = build_model(meta["model"], **json.loads(meta["model_kwargs"]))
    net.load_state_dict(load_file(path, device=str(device)))
    return net.to(device).eval(), meta
