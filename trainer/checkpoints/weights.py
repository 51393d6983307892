"""Network weights out of checkpoints and into one portable file: the EMA or the live weights of
a checkpoint (consolidated from any ZeRO stage or a universal copy, no process group needed),
`mdt-export`'s safetensors file, and the one reader of such files."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .layout import EMA_FILE, is_partitioned, is_universal
from .record import CheckpointError, CheckpointRecord, read_record

NET_PREFIX = "denoiser.net."
"""Where the network sits in the engine's module (TrainingModule.denoiser.net): DeepSpeed's files
name its parameters with this prefix."""
WEIGHT_KINDS = ("ema", "model")


def _universal_weights(checkpoint: str) -> Dict[str, torch.Tensor]:
    """The fp32 weights of a universal checkpoint: zero/<name>/fp32.pt (tensors only, no code)."""
    root = os.path.join(checkpoint, "zero")
    out = {}
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "fp32.pt")
        if os.path.isfile(path):
            out[name] = torch.load(path, map_location="cpu", weights_only=True)["param"]
    return out


def network_weights(checkpoint: str, which: str = "ema") -> Tuple[Dict[str, torch.Tensor], CheckpointRecord]:
    """(network state dict in float32, record) of a complete checkpoint.

    which='ema': the saved average; 'model': the live weights consolidated from the ZeRO shards
    through DeepSpeed's API (every stage, no process group needed), read from a universal
    checkpoint's zero/ folder, or from the ZeRO-0 model-states file.
    """
    if which not in WEIGHT_KINDS:
        raise CheckpointError(f"weights must be one of {', '.join(WEIGHT_KINDS)}, got {which!r}")
    record = read_record(checkpoint)
    if which == "ema":
        return load_file(os.path.join(checkpoint, EMA_FILE)), record
    if is_universal(checkpoint):
        full = _universal_weights(checkpoint)
    elif not is_partitioned(checkpoint):
        # ZeRO-0 keeps the whole module in the model-states file (DeepSpeed's consolidation expects
        # partitioned optimizer files and fails on it); tensors only, no code.
        full = torch.load(os.path.join(checkpoint, "mp_rank_00_model_states.pt"), map_location="cpu",
                          weights_only=True)["module"]
    else:
        # DeepSpeed only for consolidating ZeRO shards: reading EMA weights and exported files
        # (sampling) does not import it
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: PLC0415

        root, tag = os.path.split(os.path.normpath(checkpoint))
        full = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    return {k[len(NET_PREFIX):]: v.detach().float().contiguous() for k, v in full.items()
            if k.startswith(NET_PREFIX)}, record


def write_export(out_path: str, state_dict: Dict[str, torch.Tensor], model_name: str, model_kwargs: Dict[str, Any],
                 diffusion: Dict[str, Any], dataset: Dict[str, Any], step: int = 0, which: str = "ema",
                 source: str = "") -> Dict[str, str]:
    """Write one safetensors file of network weights with the metadata to rebuild the network and
    sample from it: model name and constructor kwargs, diffusion settings, dataset summary (JSON),
    step, which weights, and (for a conversion) what it was converted from."""
    meta = {"model": model_name, "model_kwargs": json.dumps(model_kwargs), "step": str(step), "weights": which,
            "diffusion": json.dumps(diffusion), "dataset": json.dumps(dataset)}
    if source:
        meta["source"] = source
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in state_dict.items()}, out_path, metadata=meta)
    return meta


def export_weights(checkpoint: str, out_path: str, which: str = "ema") -> Dict[str, str]:
    """A checkpoint's EMA or live weights as one safetensors file (see write_export)."""
    weights, record = network_weights(checkpoint, which)
    return write_export(out_path, weights, record.model_name, record.model_kwargs,
                        record.config.get("diffusion", {}), record.dataset, record.step, which)


def read_exported(path: str, device: str | torch.device = "cpu") -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict, metadata with model_kwargs / diffusion / dataset parsed from JSON) of a file
    written by `export_weights`; one-line CheckpointError for any other file."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same one-line error
        raise CheckpointError(f"cannot read {path} as safetensors: {' '.join(str(err).split())[:200]}") from None
    if "model" not in meta or "model_kwargs" not in meta:
        raise CheckpointError(f"{path} is not an mdt-export file (no model metadata)")
    for key, default in (("model_kwargs", "{}"), ("diffusion", "{}"), ("dataset", "{}")):
        meta[key] = json.loads(meta.get(key, default))
    meta["step"] = int(meta.get("step", 0))
    meta.setdefault("weights", "ema")
    return load_file(path, device=str(device)), meta
