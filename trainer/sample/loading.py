"""The one loader of trained weights for sampling: a checkpoint directory (EMA or live weights,
through the checkpoint record) or an `mdt-export` file, rebuilt as a network with its
preconditioning and what decoding needs to know about its data."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import nn

from data_tools.format import DataToolsError
from data_tools.vae import load_autoencoder
from model_zoo.registry import build_model

from ..checkpoints import WEIGHT_KINDS, CheckpointError, network_weights, read_exported, resolve_checkpoint
from ..config import ConfigError, DiffusionConfig
from ..config.parsing import config_from_dict
from ..diffusion import Denoiser


class SampleError(Exception):
    """A user-facing problem (missing checkpoint, unknown class, ...); the message is one line."""


@dataclass
class LoadedModel:
    """A network ready to sample, with what decoding needs to know about its data."""

    denoiser: Denoiser
    model_name: str
    model_kwargs: Dict[str, Any]
    dataset: Dict[str, Any]
    step: int
    weights: str
    source: str

    @property
    def skip(self) -> bool:
        """Whether the network has Skip-DiT long skips (needed for Skip-Cache)."""
        return bool(self.model_kwargs.get("skip", False))


def _diffusion(settings: Dict[str, Any], where: str) -> DiffusionConfig:
    try:
        return config_from_dict({"diffusion": settings}).diffusion
    except ConfigError as err:
        raise SampleError(f"diffusion settings of {where}: {err}") from None


def load_model(path: str, weights: Optional[str] = None, device: torch.device | str = "cpu") -> LoadedModel:
    """Network + preconditioning from a checkpoint (EMA weights unless weights='model') or an
    exported safetensors file (whichever weights it holds)."""
    if weights not in (None, *WEIGHT_KINDS):
        raise SampleError(f"--weights must be one of {', '.join(WEIGHT_KINDS)}, got {weights!r}")
    try:
        resolved = resolve_checkpoint(path)
        if os.path.isfile(resolved):
            state_dict, meta = read_exported(resolved)
            which = meta["weights"]
            if weights not in (None, which):
                raise SampleError(f"{resolved} holds {which} weights only (asked for --weights {weights})")
            name, kwargs, step = meta["model"], meta["model_kwargs"], meta["step"]
            diffusion, dataset = meta["diffusion"], meta["dataset"]
        else:
            which = weights or "ema"
            state_dict, record = network_weights(resolved, which)
            name, kwargs, step = record.model_name, record.model_kwargs, record.step
            diffusion, dataset = record.config.get("diffusion", {}), record.dataset
    except CheckpointError as err:
        raise SampleError(str(err)) from None
    if not dataset.get("latent_shape"):
        raise SampleError(f"{resolved} carries no dataset summary (latent shape, encoder): re-save or re-export "
                          f"it with this version of the trainer")
    try:
        net = build_model(name, **kwargs)
        net.load_state_dict(state_dict)
    except (ValueError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SampleError(f"cannot rebuild {name} from {resolved}: {first}") from None
    denoiser = _diffusion(diffusion, resolved).denoiser(net.eval().requires_grad_(False))
    return LoadedModel(denoiser.to(device), name, kwargs, dataset, step, which, resolved)


def load_decoder(model: LoadedModel, vae: Optional[str], device: torch.device) -> Optional[nn.Module]:
    """The VAE for latents (the dataset's encoder id, or `vae`), None for pixel data."""
    encoder = model.dataset.get("encoder") or {}
    kind = encoder.get("kind")
    if kind == "pixels":
        return None
    if kind != "vae":
        raise SampleError(f"{model.source}: unknown encoder kind {kind!r} in the dataset summary")
    try:
        return load_autoencoder(vae or encoder.get("id", ""), torch.float32).eval().requires_grad_(False).to(device)
    except DataToolsError as err:
        raise SampleError(str(err)) from None
