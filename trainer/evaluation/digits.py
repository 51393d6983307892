"""A small digit classifier that judges the digits demo: accuracy and a digits-Frechet distance.

It is trained on the real *held-out* half of scikit-learn's digits (``digits:heldout``, the
odd-indexed images), which the diffusion demo never trains on (it uses ``digits:train``). Any
image size is accepted: images are made grey and resized to the native 8x8 (bilinear, antialiased).
Training covers both the native 8x8 images and their 16x16 bicubic versions (the demo's encoding)
with 1-pixel shifts, contrast jitter and noise, so upsampled and generated digits are judged fairly.
Training takes about 15 s on one CPU core (once); the weights are cached in a safetensors file.

Penultimate-layer features (128-d) give a Frechet distance between digit image sets, as Inception
features do for natural images.
"""

from __future__ import annotations

import json
import os
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from data_tools.sources import DigitsSource, center_crop_resize
from model_zoo.digits_classifier import SIDE, DigitsClassifier, canonical

from .frechet import fd_from_features

VERSION = 1  # bump when the architecture or training recipe changes: old cache files are ignored
CACHE_ENV = "MDT_CACHE_DIR"
_LOADED: dict = {}


def real_digits(split: str = "train", resolution: int = 8) -> Tuple[np.ndarray, np.ndarray]:
    """Real digits of a split as the demo's encoder sees them: uint8 [N, R, R, 3] and labels [N].

    Same preprocessing as ``mdt-data encode --source digits:SPLIT --resolution R`` (bicubic resize).
    """
    source = DigitsSource(split)
    images = np.stack([center_crop_resize(source.load(i)[0], resolution) for i in range(len(source))])
    return images, source.labels.copy()


def _shifted(x: torch.Tensor) -> torch.Tensor:
    """All nine 1-pixel shifts (zero fill) of x [N, 1, S, S] -> [9, N, 1, S, S]."""
    side = x.shape[-1]
    padded = F.pad(x, (1, 1, 1, 1))
    return torch.stack([padded[..., dy:dy + side, dx:dx + side] for dy in range(3) for dx in range(3)])


def train_classifier(steps: int = 300, batch_size: int = 128, seed: int = 0, width: int = 32) -> DigitsClassifier:
    """Train on the held-out split (native 8x8 and 16x16 bicubic versions) with augmentation.

    The defaults reach about 99% accuracy on the real train split; tests use fewer steps / width.
    """
    native, labels = real_digits("heldout", 8)
    upsampled, _ = real_digits("heldout", 16)
    x = torch.cat([canonical(native), canonical(upsampled)])
    y = torch.from_numpy(np.concatenate([labels, labels]))
    shifts = _shifted(x)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsClassifier(width)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only add contention (and change the result)
    try:
        _train_steps(net, opt, sched, x=x, y=y, shifts=shifts, gen=gen, steps=steps, batch_size=batch_size)
    finally:
        torch.set_num_threads(threads)
    return net.eval().requires_grad_(False)


def _train_steps(net, opt, sched, *, x, y, shifts, gen, steps: int, batch_size: int) -> None:
    for _ in range(steps):
        pick = torch.randint(0, len(x), (batch_size,), generator=gen)
        shift = torch.randint(0, shifts.shape[0], (batch_size,), generator=gen)
        contrast = 0.8 + 0.4 * torch.rand(batch_size, 1, 1, 1, generator=gen)
        noise = 0.05 * torch.randn(batch_size, 1, SIDE, SIDE, generator=gen)
        xb = (shifts[shift, pick] * contrast + noise).clamp(0, 1)
        loss = F.cross_entropy(net(xb), y[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def default_path() -> str:
    """Cache file: $MDT_CACHE_DIR (default ~/.cache/masked-diffusion-trainer)/digits_classifier_vN.safetensors."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "masked-diffusion-trainer")
    return os.path.join(root, f"digits_classifier_v{VERSION}.safetensors")


def save_classifier(net: DigitsClassifier, path: str) -> str:
    """Write the weights (with version, width and real-digit accuracy in the metadata) atomically."""
    images, labels = real_digits("train", 16)
    meta = {"version": str(VERSION), "width": str(net.width), "trained_on": "digits:heldout",
            "accuracy_digits_train_16px": json.dumps(round(accuracy(images, labels, net), 4))}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp, metadata=meta)
    os.replace(tmp, path)  # several processes may race here: each writes a whole file
    return path


def load_classifier(path: str | None = None) -> DigitsClassifier:
    """The cached classifier at `path` (default: default_path()), trained and saved first if absent
    or written by another version of this module."""
    path = os.path.abspath(path or default_path())
    if path in _LOADED:
        return _LOADED[path]
    net = None
    if os.path.isfile(path):
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("version") == str(VERSION):
            net = DigitsClassifier(int(meta.get("width", 32)))
            net.load_state_dict(load_file(path))
            net.eval().requires_grad_(False)
    if net is None:
        net = train_classifier()
        save_classifier(net, path)
    _LOADED[path] = net
    return net


@torch.no_grad()
def features(images: np.ndarray, classifier: DigitsClassifier | None = None) -> np.ndarray:
    """Penultimate features [N, 128] (float64) of uint8 images [N, H, W, 3]."""
    net = classifier or load_classifier()
    return net.features(canonical(images)).double().numpy()


@torch.no_grad()
def predict(images: np.ndarray, classifier: DigitsClassifier | None = None) -> np.ndarray:
    """Predicted digit per image [N]."""
    net = classifier or load_classifier()
    return net(canonical(images)).argmax(dim=1).numpy()


def accuracy(images: np.ndarray, labels: np.ndarray, classifier: DigitsClassifier | None = None) -> float:
    """Share of images classified as their label."""
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return float((predict(images, classifier) == labels).mean())


def classifier_from(classifier: DigitsClassifier | str | None) -> DigitsClassifier:
    """A classifier given as itself, as a cache file path, or None (the default cache)."""
    if classifier is None or isinstance(classifier, str):
        return load_classifier(classifier)
    return classifier


def digits_accuracy(images: np.ndarray, labels: np.ndarray, classifier: DigitsClassifier | str | None = None
                    ) -> float:
    """Share of uint8 digit images [N, H, W, 3] that the held-out-trained classifier assigns to
    their conditioning label [N]. classifier: a DigitsClassifier, a cache path, or None (default)."""
    return accuracy(images, labels, classifier_from(classifier))


def digits_fd(images: np.ndarray, reference: np.ndarray | None = None,
              classifier: DigitsClassifier | str | None = None) -> float:
    """Frechet distance in the digit classifier's features between uint8 images [N, H, W, 3] and a
    reference set (default: the real `digits:train` split at the images' resolution)."""
    net = classifier_from(classifier)
    if reference is None:
        reference, _ = real_digits("train", images.shape[1])
    return fd_from_features(features(images, net), features(reference, net))
