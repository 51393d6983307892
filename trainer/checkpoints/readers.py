"""Every kind of weights file a user points us at, read into our network's names with what it
is: our checkpoint directories (EMA or live weights), our `mdt-export` safetensors files, and the
published DiT, SiT and MaskDiT releases (model_zoo.releases maps their layouts). Release files are
read with torch.load(weights_only=True): tensors only, no pickled code runs."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any, Dict

import torch

from model_zoo.releases import ReleaseError, convert_release

from .layout import RELEASE_SUFFIXES, resolve_checkpoint
from .record import CheckpointError
from .weights import network_weights, read_exported

RELEASE_DIFFUSION: Dict[str, Dict[str, Any]] = {
    # DiT: epsilon prediction on DDPM's linear schedule (1e-4..0.02, 1000 steps), integer timesteps
    "dit": {"preconditioning": "vp_eps", "sigma_sampler": "ddpm_linear"},
    # SiT: flow matching on the linear interpolant, velocity prediction, t uniform in training
    "sit": {"preconditioning": "flow", "sigma_sampler": "flow_uniform"},
    # MaskDiT: EDM preconditioning, sigma_data 0.5, c_noise = ln(sigma) / 4
    "maskdit": {"preconditioning": "edm", "sigma_data": 0.5},
}
"""The diffusion settings each release was trained with, as our config's `diffusion` section."""

RELEASE_VAE = "stabilityai/sd-vae-ft-mse"
"""The VAE the releases' latents come from (Stable Diffusion's, scale 0.18215); sampling takes a
local copy through `mdt-sample --vae DIR` (nothing is downloaded)."""


@dataclass
class NetworkSource:
    """Network weights in our names and what they are: the registry model and its constructor
    arguments, the diffusion settings it was trained with, a summary of its data, the step, which
    weights (ema / model), and the kind of file (checkpoint, export, dit-release, sit-release,
    maskdit-release)."""

    kind: str
    path: str
    model_name: str
    model_kwargs: Dict[str, Any]
    state_dict: Dict[str, torch.Tensor] = field(repr=False)
    diffusion: Dict[str, Any]
    dataset: Dict[str, Any]
    step: int = 0
    weights: str = "ema"


def _release_dataset(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    size = kwargs["input_size"]
    return {"latent_shape": [kwargs["in_channels"], size, size], "num_classes": kwargs["num_classes"],
            "scaling_factor": 0.18215, "encoder": {"kind": "vae", "id": RELEASE_VAE}, "resolution": size * 8,
            "class_names": None}


def read_release(path: str, weights: str | None = None, layout: str | None = None,
                 num_heads: int | None = None, decoder_num_heads: int | None = None) -> NetworkSource:
    """A published release file as our weights. A file whose name contains 'sit' is taken as SiT's
    (its layout is DiT's) unless `layout` says otherwise."""
    try:
        # training checkpoints of the reference code (MaskDiT's train.py, DiT's) also hold their
        # argparse Namespace: allowed as data; nothing else beyond tensors and containers
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same one-line error
        raise CheckpointError(f"cannot read {path} as a tensors-only torch file: "
                              f"{' '.join(str(err).split())[:200]}") from None
    if weights == "model" and isinstance(obj, dict):  # a training checkpoint's live weights, not its EMA
        obj = next((obj[k] for k in ("net", "model") if isinstance(obj.get(k), dict)), obj)
    if layout is None and "sit" in os.path.basename(path).lower():
        layout = "sit"
    try:
        release = convert_release(obj, layout, num_heads, decoder_num_heads)
    except ReleaseError as err:
        raise CheckpointError(f"{path}: {err}") from None
    return NetworkSource(f"{release.layout}-release", path, release.model_name, release.model_kwargs,
                         release.state_dict, dict(RELEASE_DIFFUSION[release.layout]),
                         _release_dataset(release.model_kwargs), 0, weights or "ema")


def read_network(path: str, weights: str | None = None, layout: str | None = None,
                 num_heads: int | None = None, decoder_num_heads: int | None = None) -> NetworkSource:
    """Weights from a checkpoint directory (or a run / checkpoints directory: its newest complete
    checkpoint), an `mdt-export` file or a release file. `weights`: 'ema' (default) or 'model';
    `layout`, `num_heads`, `decoder_num_heads`: for releases (see model_zoo.releases)."""
    resolved = resolve_checkpoint(path)
    if resolved.endswith(RELEASE_SUFFIXES):
        return read_release(resolved, weights, layout, num_heads, decoder_num_heads)
    if os.path.isfile(resolved):
        state_dict, meta = read_exported(resolved)
        if weights not in (None, meta["weights"]):
            raise CheckpointError(f"{resolved} holds {meta['weights']} weights only (asked for {weights})")
        return NetworkSource("export", resolved, meta["model"], meta["model_kwargs"], state_dict, meta["diffusion"],
                             meta["dataset"], meta["step"], meta["weights"])
    state_dict, record = network_weights(resolved, weights or "ema")
    return NetworkSource("checkpoint", resolved, record.model_name, record.model_kwargs, state_dict,
                         record.config.get("diffusion", {}), record.dataset, record.step, weights or "ema")
