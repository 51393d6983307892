"""mdt-eval's inputs and its per-metric computations on them: `ImageSets` (the generated images,
read on first use, the reference as given, the weights files) and one function per metric of the
registry that has one (`registry.py` imports them when a metric is computed)."""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import numpy as np

from model_zoo.inception import InceptionWeightsError, load_fid_inception

from ..distributed import accelerator_device
from .digits import digits_accuracy, digits_fd
from .errors import EvalError
from .fid import fid
from .images import load_images, load_reference_stats
from .mnist import mnist_accuracy, mnist_fd


class ImageSets:
    """mdt-eval's inputs as the metric functions read them: the generated images and labels (read
    on first use, so that a metric's own checks and weights come first), the reference as given, the
    weights files and the Inception batch size. A function that reads a reference set records its
    size in `counts` (num_reference)."""

    def __init__(self, generated: str, reference: str | None, *, inception: str | None = None,
                 digits_classifier: str | None = None, mnist_classifier: str | None = None, batch_size: int = 50):
        self.generated, self.reference = generated, reference
        self.inception, self.digits_classifier, self.batch_size = inception, digits_classifier, batch_size
        self.mnist_classifier = mnist_classifier
        self.counts: Dict[str, float] = {}
        self._loaded: Tuple[np.ndarray, np.ndarray | None] | None = None

    def _load(self) -> Tuple[np.ndarray, np.ndarray | None]:
        if self._loaded is None:
            self._loaded = load_images(self.generated)
        return self._loaded

    @property
    def images(self) -> np.ndarray:
        """The generated images, uint8 [N, H, W, 3]."""
        return self._load()[0]

    @property
    def labels(self) -> np.ndarray | None:
        """The generated images' labels [N] (None when the set has none)."""
        return self._load()[1]


def fid_metric(sets: ImageSets) -> float:
    """FID of the generated images against the reference set or its precomputed statistics."""
    if sets.reference is None:
        raise EvalError("fid needs a reference set (second argument)")
    try:
        model = load_fid_inception(sets.inception, accelerator_device())  # fail on missing weights before any work
    except InceptionWeightsError as err:
        raise EvalError(str(err)) from None
    images = sets.images
    stats = load_reference_stats(sets.reference)
    ref = stats if stats is not None else load_images(sets.reference, images.shape[1])[0]
    if stats is None:
        sets.counts["num_reference"] = float(len(ref))
    return fid(images, ref, batch_size=sets.batch_size, model=model)


def _judge_fd(sets: ImageSets, data: str, fd: Callable[..., float], classifier: str | None) -> float:
    """A judge's Frechet distance against the reference set (default the data set's train split)."""
    images = sets.images
    ref_images = load_images(sets.reference or f"{data}:train", images.shape[1])[0]
    sets.counts["num_reference"] = float(len(ref_images))
    return fd(images, ref_images, classifier)


def _judge_acc(sets: ImageSets, data: str, accuracy: Callable[..., float], classifier: str | None) -> float:
    """The share of generated images a judge assigns to their labels."""
    if sets.labels is None:
        raise EvalError(f"{data}_acc needs labels: {sets.generated} has no arr_1 (class labels)")
    return accuracy(sets.images, sets.labels, classifier)


def digits_fd_metric(sets: ImageSets) -> float:
    """The digits Frechet distance against the reference set (default the digits' train split)."""
    return _judge_fd(sets, "digits", digits_fd, sets.digits_classifier)


def digits_acc_metric(sets: ImageSets) -> float:
    """The share of generated digits the classifier assigns to their labels."""
    return _judge_acc(sets, "digits", digits_accuracy, sets.digits_classifier)


def mnist_fd_metric(sets: ImageSets) -> float:
    """The MNIST Frechet distance against the reference set (default the MNIST train split)."""
    return _judge_fd(sets, "mnist", mnist_fd, sets.mnist_classifier)


def mnist_acc_metric(sets: ImageSets) -> float:
    """The share of generated MNIST digits the MNIST classifier assigns to their labels."""
    return _judge_acc(sets, "mnist", mnist_accuracy, sets.mnist_classifier)
