"""What `mdt-eval` computes, as a function: the metrics registry and `evaluate`.

    mdt-eval samples/samples.npz ref/VIRTUAL_imagenet256_labeled.npz --inception pt_inception.pth
    mdt-eval samples/samples.npz digits:train --metrics digits_fd,digits_acc

Image sets are an `.npz` of uint8 images [N, H, W, 3] under `arr_0` (labels, if any, under
`arr_1`: what `mdt-sample` and guided-diffusion's samplers write, and what its evaluator reads),
a directory of images (read recursively, sorted), or a built-in `digits:train` / `digits:heldout`.
A reference `.npz` holding `mu` / `sigma` (and no `arr_0`) gives precomputed Inception statistics.
Metrics: `fid` (Inception-v3 pool features of the TensorFlow FID graph that ADM's evaluator runs,
preprocessing included; weights from a local file), `digits_fd` (Frechet distance in the digit
classifier's 128-d features) and `digits_acc` (share of generated digits the classifier assigns to
their conditioning label; needs labels).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

from model_zoo.inception import InceptionWeightsError, load_fid_inception

from ..distributed import accelerator_device
from .digits import digits_accuracy, digits_fd
from .errors import EvalError
from .fid import fid
from .images import load_images, load_reference_stats

METRICS: Dict[str, str] = {"fid": "{:.4f}", "digits_fd": "{:.4f}", "digits_acc": "{:.2%}"}
"""The metrics `evaluate` knows: name -> how `mdt-eval` prints the value."""


def evaluate(generated: str, reference: Optional[str], metrics: Sequence[str], inception: Optional[str] = None,
             digits_classifier: Optional[str] = None, batch_size: int = 50) -> Dict[str, float]:
    """The CLI's work as a function: {metric: value} plus counts."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise EvalError(f"unknown metric {unknown[0]!r}: choose from {', '.join(METRICS)}")
    model = None
    if "fid" in metrics:
        if reference is None:
            raise EvalError("fid needs a reference set (second argument)")
        try:
            model = load_fid_inception(inception, accelerator_device())  # fail on missing weights before any work
        except InceptionWeightsError as err:
            raise EvalError(str(err)) from None
    images, labels = load_images(generated)
    results: Dict[str, float] = {"num_generated": float(len(images))}
    if "fid" in metrics:
        stats = load_reference_stats(reference)
        ref = stats if stats is not None else load_images(reference, images.shape[1])[0]
        results["fid"] = fid(images, ref, batch_size=batch_size, model=model)
        if stats is None:
            results["num_reference"] = float(len(ref))
    if "digits_fd" in metrics:
        ref_images = load_images(reference or "digits:train", images.shape[1])[0]
        results["digits_fd"] = digits_fd(images, ref_images, digits_classifier)
        results["num_reference"] = float(len(ref_images))
    if "digits_acc" in metrics:
        if labels is None:
            raise EvalError(f"digits_acc needs labels: {generated} has no arr_1 (class labels)")
        results["digits_acc"] = digits_accuracy(images, labels, digits_classifier)
    return results
