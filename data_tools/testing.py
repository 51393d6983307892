"""Small offline fixtures for tests and demos: a tiny random VAE and generated image sources."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
from PIL import Image


def make_tiny_vae(path: str, latent_channels: int = 4, seed: int = 0) -> str:
    """Save a randomly initialised 2-level AutoencoderKL (downsampling factor 2) to ``path``,
    loadable with ``AutoencoderKL.from_pretrained(path)`` exactly like a real VAE."""
    # heavy, and only the VAE fixture needs them (the image writers below do not)
    import torch  # noqa: PLC0415
    from diffusers import AutoencoderKL  # noqa: PLC0415

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(path)
    return path


def make_tiny_teacher(path: str, image_size: int = 16, patch: int = 2, width: int = 16, seed: int = 0) -> str:
    """Save a randomly initialised tiny DINOv2 (transformers format) to `path`; returns `path`."""
    import torch  # noqa: PLC0415 - only the teacher tests need these
    from transformers import Dinov2Config, Dinov2Model  # noqa: PLC0415

    torch.manual_seed(seed)
    config = Dinov2Config(image_size=image_size, patch_size=patch, hidden_size=width, num_hidden_layers=2,
                          num_attention_heads=2, mlp_ratio=2)
    Dinov2Model(config).save_pretrained(path)
    return path


def _image(rng: np.random.Generator, label: int, index: int) -> Image.Image:
    """A varied little picture: size, aspect ratio and mode change with the index."""
    h, w = 12 + 3 * (index % 4), 10 + 5 * (index % 3)
    base = np.zeros((h, w, 3), dtype=np.uint8)
    base[..., label % 3] = 60 + 60 * (label % 4)
    noise = rng.integers(0, 80, size=(h, w, 3), dtype=np.uint8)
    image = Image.fromarray(base + noise, mode="RGB")
    return image.convert(("RGB", "L", "RGBA")[index % 3])


def make_image_folder(root: str, classes: int = 3, per_class: int = 4, seed: int = 0) -> str:
    """Write ``root/class_k/img_i.png`` files (ImageNet's train/ layout)."""
    rng = np.random.default_rng(seed)
    for label in range(classes):
        folder = os.path.join(root, f"class_{label}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            _image(rng, label, i).save(os.path.join(folder, f"img_{i:03d}.png"))
    return root


def make_image_tars(root: str, classes: int = 3, per_class: int = 4, per_tar: int = 5, seed: int = 0) -> str:
    """Write WebDataset-style image tars (``KEY.png`` + ``KEY.cls``); returns a brace pattern."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    items = [(label, i) for label in range(classes) for i in range(per_class)]
    chunks = [items[j:j + per_tar] for j in range(0, len(items), per_tar)]
    for t, chunk in enumerate(chunks):
        with tarfile.open(os.path.join(root, f"images-{t:03d}.tar"), "w") as tar:
            for label, i in chunk:
                buf = io.BytesIO()
                _image(rng, label, i).save(buf, format="PNG")
                for field, data in (("png", buf.getvalue()), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"c{label}_{i:03d}.{field}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return os.path.join(root, f"images-{{000..{len(chunks) - 1:03d}}}.tar")
