"""A small digit classifier that judges the digits demo: accuracy and a digits-Frechet distance.

It is trained on the real *held-out* half of scikit-learn's digits (``digits:heldout``, the
odd-indexed images), which the diffusion demo never trains on (it uses ``digits:train``). Any
image size is accepted: images are made grey and resized to the native 8x8 (bilinear, antialiased).
Training covers both the native 8x8 images and their 16x16 bicubic versions (the demo's encoding)
with 1-pixel shifts, contrast jitter and noise, so upsampled and generated digits are judged fairly.
Training takes about 15 s on one CPU core (once); the weights are cached in a safetensors file.

Penultimate-layer features (128-d) give a Frechet distance between digit image sets, as Inception
features do for natural images. The machinery is shared with the MNIST judge (`judge.py`); this
module is the digits' `Judge` and its functions.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from data_tools.sources import DigitsSource
from model_zoo.digits_classifier import DigitsClassifier, canonical

from .judge import CACHE_ENV, Judge

VERSION = 1  # bump when the architecture or training recipe changes: old cache files are ignored
DIGITS = Judge(name="digits", version=VERSION, source=DigitsSource, network=DigitsClassifier, canonical=canonical,
               native=8, train_resolutions=(8, 16), check_resolution=16, steps=300, width=32, shift=1)
"""The digits judge: DigitsClassifier on 8x8 input, trained on 8x8 and 16x16 held-out digits."""

__all__ = ["CACHE_ENV", "DIGITS", "VERSION", "accuracy", "classifier_from", "default_path", "digits_accuracy",
           "digits_fd", "features", "load_classifier", "predict", "real_digits", "save_classifier",
           "train_classifier"]


def real_digits(split: str = "train", resolution: int = 8) -> Tuple[np.ndarray, np.ndarray]:
    """Real digits of a split as the demo's encoder sees them: uint8 [N, R, R, 3] and labels [N].

    Same preprocessing as ``mdt-data encode --source digits:SPLIT --resolution R`` (bicubic resize).
    """
    return DIGITS.real(split, resolution)


def train_classifier(steps: int = 300, batch_size: int = 128, seed: int = 0, width: int = 32) -> DigitsClassifier:
    """Train on the held-out split (native 8x8 and 16x16 bicubic versions) with augmentation.

    The defaults reach about 99% accuracy on the real train split; tests use fewer steps / width.
    """
    return DIGITS.train(steps, batch_size, seed, width)


def default_path() -> str:
    """Cache file: $MDT_CACHE_DIR (default ~/.cache/masked-diffusion-trainer)/digits_classifier_vN.safetensors."""
    return DIGITS.default_path()


def save_classifier(net: DigitsClassifier, path: str) -> str:
    """Write the weights (with version, width and real-digit accuracy in the metadata) atomically."""
    return DIGITS.save(net, path)


def load_classifier(path: str | None = None) -> DigitsClassifier:
    """The cached classifier at `path` (default: default_path()), trained and saved first if absent
    or written by another version of this module."""
    return DIGITS.load(path)


def features(images: np.ndarray, classifier: DigitsClassifier | None = None) -> np.ndarray:
    """Penultimate features [N, 128] (float64) of uint8 images [N, H, W, 3]."""
    return DIGITS.features(images, classifier)


def predict(images: np.ndarray, classifier: DigitsClassifier | None = None) -> np.ndarray:
    """Predicted digit per image [N]."""
    return DIGITS.predict(images, classifier)


def accuracy(images: np.ndarray, labels: np.ndarray, classifier: DigitsClassifier | None = None) -> float:
    """Share of images classified as their label."""
    return DIGITS.accuracy(images, labels, classifier)


def classifier_from(classifier: DigitsClassifier | str | None) -> DigitsClassifier:
    """A classifier given as itself, as a cache file path, or None (the default cache)."""
    return DIGITS.resolve(classifier)


def digits_accuracy(images: np.ndarray, labels: np.ndarray, classifier: DigitsClassifier | str | None = None
                    ) -> float:
    """Share of uint8 digit images [N, H, W, 3] that the held-out-trained classifier assigns to
    their conditioning label [N]. classifier: a DigitsClassifier, a cache path, or None (default)."""
    return DIGITS.accuracy(images, labels, classifier)


def digits_fd(images: np.ndarray, reference: np.ndarray | None = None,
              classifier: DigitsClassifier | str | None = None) -> float:
    """Frechet distance in the digit classifier's features between uint8 images [N, H, W, 3] and a
    reference set (default: the real `digits:train` split at the images' resolution)."""
    return DIGITS.fd(images, reference, classifier)
