"""Frozen teachers for representation alignment: a vision transformer's patch features of each
image, computed once when the shards are encoded (REPA recomputes them every training step).

A teacher is a local directory that Hugging Face transformers loads with
``AutoModel.from_pretrained``: DINOv2 (REPA's choice; save ``facebook/dinov2-base`` with
``save_pretrained`` on a machine with internet), another ViT, or the digits teacher that
``mdt-data teacher`` trains. Nothing is downloaded (``local_files_only``).

The image is resized to ``grid x patch`` pixels so that the teacher's patch tokens form exactly
the latent token grid (DINOv2's patch 14 and a 16 x 16 grid: 224 pixels, REPA's setting); the
position embeddings are interpolated by the model. Features may be reduced to fewer channels by a
PCA fitted once on a sample of the data (``fit_projection``); the reduced features are coordinates
of the deviation from the sample's mean feature.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

from .format import FEATURE_PROJECTION, DataToolsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise DataToolsError(f"cannot read {path}: {exc}") from None


class Teacher:
    """A frozen ViT from a local transformers directory; ``features`` gives patch features."""

    kind = "transformers"

    def __init__(self, path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        """Load the model (no download); DataToolsError naming the path when it cannot."""
        if not os.path.isdir(path):
            raise DataToolsError(f"--features {path}: not a directory (want a transformers model saved with "
                                 "save_pretrained)")
        config = _read_json(os.path.join(path, "config.json"))
        if "patch_size" not in config or "hidden_size" not in config:
            raise DataToolsError(f"--features {path}: config.json names no patch_size / hidden_size (not a ViT)")
        try:
            from transformers import AutoModel  # noqa: PLC0415 - heavy; only feature encoding needs it
            from transformers.utils import logging as hf_logging  # noqa: PLC0415

            # its notes on unused classifier weights and its progress bars would bury our own lines
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
            model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
        except Exception as exc:  # noqa: BLE001 - every loading failure is the same one-line error
            raise DataToolsError(f"--features {path}: cannot load the teacher ({type(exc).__name__}: "
                                 f"{' '.join(str(exc).split())[:200]})") from None
        self.model = model.eval().requires_grad_(False).to(device)
        self.device, self.dtype = torch.device(device), dtype
        self.patch = int(config["patch_size"])
        self.dim = int(config["hidden_size"])
        processor = _read_json(os.path.join(path, "preprocessor_config.json"))
        self.mean = torch.tensor(processor.get("image_mean", IMAGENET_MEAN)).view(1, -1, 1, 1)
        self.std = torch.tensor(processor.get("image_std", IMAGENET_STD)).view(1, -1, 1, 1)
        # a plain ViT interpolates its position table only when asked; DINOv2 always does
        self._extra = {"interpolate_pos_encoding": True} \
            if "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters else {}
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
        self.id = f"{os.path.basename(os.path.normpath(path))}:{config.get('model_type', '?')}:{digest}"

    @torch.inference_mode()
    def features(self, images: torch.Tensor, grid: int) -> torch.Tensor:
        """uint8 images [B, 3, H, W] -> float32 patch features [B, D, grid, grid] (CPU)."""
        side = grid * self.patch
        x = images.float().div(255.0)
        if x.shape[-1] != side or x.shape[-2] != side:
            x = F.interpolate(x, size=(side, side), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        x = ((x - self.mean) / self.std).to(self.device, self.dtype)
        hidden = self.model(pixel_values=x, **self._extra).last_hidden_state
        tokens = hidden[:, hidden.shape[1] - grid * grid:]  # patch tokens come after CLS / registers
        return tokens.float().transpose(1, 2).reshape(len(images), self.dim, grid, grid).cpu()


class Projection:
    """A PCA of teacher features: ``apply`` maps [B, D, G, G] to [B, dim, G, G]."""

    def __init__(self, mean: np.ndarray, components: np.ndarray, explained: float, fitted_on: str = ""):
        """mean [D], components [dim, D] (orthonormal rows), explained variance share, and what it was
        fitted on (teacher id and image count), so a stale file is never reused."""
        self.mean = torch.from_numpy(np.asarray(mean, dtype=np.float32))
        self.components = torch.from_numpy(np.asarray(components, dtype=np.float32))
        self.explained = float(explained)
        self.fitted_on = fitted_on

    @property
    def dim(self) -> int:
        """Channels after projection."""
        return self.components.shape[0]

    def apply(self, features: torch.Tensor) -> torch.Tensor:
        """[B, D, G, G] -> [B, dim, G, G] (float32)."""
        centred = features.float() - self.mean.view(1, -1, 1, 1)
        return torch.einsum("kd,bdhw->bkhw", self.components, centred)

    def save(self, path: str) -> None:
        """Write the projection as .npz (first writer wins: parallel parts all use one file)."""
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as handle:
            np.savez(handle, mean=self.mean.numpy(), components=self.components.numpy(),
                     explained=np.float32(self.explained), fitted_on=np.array(self.fitted_on))
        try:
            os.link(tmp, path)  # fails if another part wrote it first; then everyone uses that one
        except FileExistsError:
            pass
        finally:
            os.remove(tmp)

    @classmethod
    def load(cls, path: str) -> "Projection":
        """Read a projection written by ``save``."""
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(data["mean"], data["components"], float(data["explained"]), str(data["fitted_on"]))
        except (OSError, KeyError, ValueError) as exc:
            raise DataToolsError(f"cannot read the feature projection {path}: {exc}") from None


def fit_projection(features: torch.Tensor, dim: int, fitted_on: str = "") -> Projection:
    """PCA of features [N, D, G, G] (every token of every image a sample) to ``dim`` channels.
    Each component's sign is fixed (largest entry positive), so a refit gives the same file."""
    if not 1 <= dim <= features.shape[1]:
        raise DataToolsError(f"--features-dim {dim} must be in 1..{features.shape[1]} (the teacher's width)")
    tokens = features.float().permute(0, 2, 3, 1).reshape(-1, features.shape[1]).double()
    mean = tokens.mean(0)
    _, singular, vh = torch.linalg.svd(tokens - mean, full_matrices=False)
    components = vh[:dim]
    signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
    components = components * signs
    explained = float((singular[:dim] ** 2).sum() / (singular ** 2).sum().clamp_min(1e-30))
    return Projection(mean.float().numpy(), components.float().numpy(), explained, fitted_on)


def projection_path(out: str) -> str:
    """Where a dataset keeps its feature projection."""
    return os.path.join(out, FEATURE_PROJECTION)
