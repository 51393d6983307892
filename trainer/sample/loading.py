"""The one loader of weights for sampling: a checkpoint directory (EMA or live weights, through the
checkpoint record), an `mdt-export` file or a published release, rebuilt as a network with its
preconditioning and what decoding needs to know about its data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

import torch
from torch import nn

from data_tools.format import DataToolsError
from data_tools.vae import load_autoencoder
from model_zoo.registry import build_model

from ..checkpoints import WEIGHT_KINDS, CheckpointError, read_network
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
    kind: str = "checkpoint"
    """checkpoint, export, dit-release or maskdit-release (trainer.checkpoints.NetworkSource)."""

    @property
    def skip(self) -> bool:
        """Whether the network has Skip-DiT long skips (needed for Skip-Cache)."""
        return bool(self.model_kwargs.get("skip", False))


def _diffusion(settings: Dict[str, Any], where: str) -> DiffusionConfig:
    try:
        return config_from_dict({"diffusion": settings}).diffusion
    except ConfigError as err:
        raise SampleError(f"diffusion settings of {where}: {err}") from None


def load_model(path: str, weights: str | None = None, device: torch.device | str = "cpu", *,
               layout: str | None = None, num_heads: int | None = None,
               decoder_num_heads: int | None = None) -> LoadedModel:
    """Our network with the preconditioning it was trained with, from anything
    trainer.checkpoints.read_network reads: a checkpoint (EMA weights unless weights='model'), an
    exported safetensors file, or a published DiT / MaskDiT release (`layout`, `num_heads`,
    `decoder_num_heads` as there). `LoadedModel.kind` says which."""
    if weights not in (None, *WEIGHT_KINDS):
        raise SampleError(f"--weights must be one of {', '.join(WEIGHT_KINDS)}, got {weights!r}")
    try:
        src = read_network(path, weights, layout=layout, num_heads=num_heads, decoder_num_heads=decoder_num_heads)
    except CheckpointError as err:
        raise SampleError(str(err)) from None
    if not src.dataset.get("latent_shape"):
        raise SampleError(f"{src.path} carries no dataset summary (latent shape, encoder): re-save or re-export "
                          f"it with this version of the trainer")
    try:
        net = build_model(src.model_name, **src.model_kwargs)
        net.load_state_dict(src.state_dict)
    except (ValueError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SampleError(f"cannot rebuild {src.model_name} from {src.path}: {first}") from None
    denoiser = _diffusion(src.diffusion, src.path).denoiser(net.eval().requires_grad_(False))
    return LoadedModel(denoiser=denoiser.to(device), model_name=src.model_name, model_kwargs=src.model_kwargs,
                       dataset=src.dataset, step=src.step, weights=src.weights, source=src.path, kind=src.kind)


def load_decoder(model: LoadedModel, vae: str | None, device: torch.device) -> nn.Module | None:
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
