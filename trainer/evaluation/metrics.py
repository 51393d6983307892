"""What `mdt-eval` computes, as a function: `evaluate` runs the registry's functions (registry.py)
on image sets.

    mdt-eval samples/samples.npz ref/VIRTUAL_imagenet256_labeled.npz --inception pt_inception.pth
    mdt-eval samples/samples.npz digits:train --metrics digits_fd,digits_acc
    mdt-eval samples/samples.npz mnist:train --metrics mnist_fd,mnist_acc

Image sets are an `.npz` of uint8 images [N, H, W, 3] under `arr_0` (labels, if any, under
`arr_1`: what `mdt-sample` and guided-diffusion's samplers write, and what its evaluator reads),
a directory of images (read recursively, sorted), or a built-in `digits:train` / `digits:heldout` /
`mnist:train` / `mnist:heldout`.
A reference `.npz` holding `mu` / `sigma` (and no `arr_0`) gives precomputed Inception statistics.
Metrics: `fid` (Inception-v3 pool features of the TensorFlow FID graph that ADM's evaluator runs,
preprocessing included; weights from a local file), `digits_fd` (Frechet distance in the digit
classifier's 128-d features) and `digits_acc` (share of generated digits the classifier assigns to
their conditioning label; needs labels), and their MNIST counterparts `mnist_fd` and `mnist_acc`
(the MNIST judge, trained on `mnist:heldout`).
"""

from __future__ import annotations

from typing import Dict, Sequence

from .errors import EvalError
from .image_sets import ImageSets
from .registry import METRIC_SPECS, MetricSpec

METRICS: Dict[str, MetricSpec] = {name: spec for name, spec in METRIC_SPECS.items() if spec.function is not None}
"""The metrics `evaluate` knows: those of the registry with a function on image sets."""


def evaluate(generated: str, reference: str | None, metrics: Sequence[str], *, inception: str | None = None,
             digits_classifier: str | None = None, mnist_classifier: str | None = None,
             batch_size: int = 50) -> Dict[str, float]:
    """The CLI's work as a function: {metric: value} plus counts (num_generated, num_reference),
    each metric computed once, in the order asked."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise EvalError(f"unknown metric {unknown[0]!r}: choose from {', '.join(METRICS)}")
    sets = ImageSets(generated, reference, inception=inception, digits_classifier=digits_classifier,
                     mnist_classifier=mnist_classifier, batch_size=batch_size)
    values: Dict[str, float] = {}
    for name in dict.fromkeys(metrics):
        values[name] = METRICS[name].function(sets)
        values.update(sets.counts)
    return {"num_generated": float(len(sets.images)), **values}
