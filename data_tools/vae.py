"""Encoders that turn uint8 image batches into stored latent moments.

``vae``: a diffusers AutoencoderKL (the Stable Diffusion KL-f8 VAE or any compatible one) loaded
with ``from_pretrained``; stores the posterior mean and std. ``pixels``: identity scaled to
[-1, 1], for small data and tests.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from urllib.parse import urlparse

import numpy as np
import torch

from .format import MOMENTS_DETERMINISTIC, MOMENTS_VAE, SD_VAE_SCALING_FACTOR, DataToolsError

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
ENCODERS = ("vae", "pixels")


def pick_device(local_index: int = 0) -> tuple[torch.device, torch.dtype]:
    """Device and compute dtype from DeepSpeed's accelerator: bf16 (else fp16) on accelerators,
    fp32 on CPU where half precision is slow and gains nothing."""
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415 - heavy; only encoding on a device needs it

    accel = get_accelerator()
    if accel.device_name() == "cpu":
        return torch.device("cpu"), torch.float32
    count = max(1, accel.device_count())
    device = torch.device(accel.device_name(local_index % count))
    dtype = torch.bfloat16 if accel.is_bf16_supported() else torch.float16
    return device, dtype


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] in 0..255 -> float32 in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


class PixelEncoder:
    """Identity 'encoder': the latent is the image itself in [-1, 1] (no posterior std)."""

    kind = "pixels"
    moments = MOMENTS_DETERMINISTIC
    scaling_factor = 1.0

    def __init__(self) -> None:
        """Nothing to load."""
        self.id = "pixels"

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """Three channels at full resolution."""
        return (3, resolution, resolution)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> np.ndarray:
        """uint8 [B, 3, H, W] -> float16 [B, 1, 3, H, W]."""
        return to_unit_range(images).numpy().astype(np.float16)[:, None]


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not os.path.exists(name)


def load_autoencoder(name: str, dtype: torch.dtype = torch.float32):
    """Load a diffusers AutoencoderKL from a local directory or a hub id (cache first).

    Raises DataToolsError with a one-line hint when the weights are not on this machine.
    """
    from diffusers import AutoencoderKL  # noqa: PLC0415 - heavy (seconds); only VAE encoding / decoding needs it

    hint = (f"copy the VAE to this machine (e.g. `huggingface-cli download {DEFAULT_VAE} "
            f"--local-dir /data/sd-vae` where there is internet) and pass --vae /data/sd-vae")
    if not os.path.isdir(name) and not _looks_like_hub_id(name):
        raise DataToolsError(f"VAE directory {name} does not exist; {hint}")
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    # The hub client logs every retry and warns about its own arguments: our error is the message.
    hub_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _load(AutoencoderKL, name, hint, dtype)
    finally:
        hub_log.setLevel(level)


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """None when the Hugging Face endpoint ($HF_ENDPOINT or huggingface.co) may be reachable, else
    a reason naming the host and port that accepted no connection.

    Without this, a machine with no route to the hub spends ~25 s in the hub client's retries
    before the download fails. Behind a proxy (HTTPS_PROXY etc.) nothing is probed: the hub
    client goes through the proxy, and only it knows the way.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                       "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError:
        return f"{host}:{port} accepted no connection within {timeout:g} s"


def _load(cls, name: str, hint: str, dtype: torch.dtype):
    if os.path.isdir(name):
        try:
            return cls.from_pretrained(name, torch_dtype=dtype, low_cpu_mem_usage=False)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataToolsError(f"cannot load VAE from {name}: {first}") from None
    try:
        return cls.from_pretrained(name, local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False)
    except (OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no"):
        raise DataToolsError(f"VAE {name} is not in the local Hugging Face cache (HF_HUB_OFFLINE is set); {hint}")
    unreachable = hub_unreachable()
    if unreachable:
        raise DataToolsError(f"VAE {name} is not in the local Hugging Face cache and the hub is unreachable "
                             f"({unreachable}); {hint}")
    try:
        return cls.from_pretrained(name, torch_dtype=dtype, low_cpu_mem_usage=False)
    except Exception:  # network errors come in many types; the hint says what to do
        raise DataToolsError(f"cannot load VAE {name}: not a local directory, not cached, "
                             f"download failed; {hint}") from None


class VaeEncoder:
    """KL autoencoder posterior (mean, std) per image, batched on the accelerator."""

    kind = "vae"
    moments = MOMENTS_VAE

    def __init__(self, name: str = DEFAULT_VAE, scaling_factor: float | None = None,
                 local_index: int = 0):
        """Load the VAE; ``scaling_factor`` overrides the one in the VAE config."""
        self.id = name
        self.device, self.dtype = pick_device(local_index)
        # Loading in the compute dtype lets diffusers keep any fp32-only modules in fp32.
        self.vae = load_autoencoder(name, self.dtype).eval().requires_grad_(False).to(self.device)
        config = self.vae.config
        factor = scaling_factor if scaling_factor is not None else getattr(config, "scaling_factor", None)
        self.scaling_factor = float(factor if factor is not None else SD_VAE_SCALING_FACTOR)
        self.channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """[C, H/f, W/f] for the VAE's downsampling factor f."""
        if resolution % self.downsample:
            raise DataToolsError(f"--resolution {resolution} is not a multiple of the VAE factor {self.downsample}")
        side = resolution // self.downsample
        return (self.channels, side, side)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> np.ndarray:
        """uint8 [B, 3, H, W] -> float16 [B, 2, C, h, w] holding (mean, std)."""
        x = to_unit_range(images).to(self.device, self.dtype)
        posterior = self.vae.encode(x).latent_dist
        moments = torch.stack([posterior.mean, posterior.std], dim=1)
        return moments.float().cpu().numpy().astype(np.float16)


def build_encoder(kind: str, vae: str = DEFAULT_VAE, scaling_factor: float | None = None,
                  local_index: int = 0) -> PixelEncoder | VaeEncoder:
    """Construct the encoder named by ``kind`` (one of ENCODERS)."""
    if kind == "pixels":
        if scaling_factor not in (None, 1.0):
            raise DataToolsError("--scaling-factor applies to --encoder vae only (pixels use 1.0)")
        return PixelEncoder()
    if kind == "vae":
        return VaeEncoder(vae, scaling_factor, local_index)
    raise DataToolsError(f"unknown encoder {kind!r}: choose from {', '.join(ENCODERS)}")
