"""`mdt-eval`: Frechet distances and class accuracy of generated images.

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

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
METRICS = ("fid", "digits_fd", "digits_acc")


class EvalError(Exception):
    """A user-facing problem (missing file, bad layout); the message is one line."""


# ----------------------------------------------------------------------------- Frechet distance


def feature_stats(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean [D] and (unbiased) covariance [D, D] of features [N, D], in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise EvalError(f"need features [N >= 2, D], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2):

        |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix S1^(1/2) S2 S1^(1/2) (same spectrum as S1 S2), so it stays real and finite for
    singular covariances, where an unsymmetric matrix square root needs an offset.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise EvalError(f"feature statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                        f"sigma {s1.shape} vs {s2.shape}")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fd_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between two feature sets [N, D] and [M, D]."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))


# ----------------------------------------------------------------------------- image sets


def load_images(path: str, resolution: Optional[int] = None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """uint8 images [N, H, W, 3] and labels [N] (or None) from an .npz, an image directory, or
    `digits:SPLIT` (real digits at `resolution`, default 8)."""
    if path.startswith("digits:"):
        from data_tools.format import DataToolsError

        from .digits_classifier import real_digits

        try:
            return real_digits(path.partition(":")[2], resolution or 8)
        except DataToolsError as err:
            raise EvalError(str(err)) from None
    if os.path.isdir(path):
        return _load_dir(path), None
    if not os.path.isfile(path):
        raise EvalError(f"image set {path} does not exist")
    if not path.endswith(".npz"):
        raise EvalError(f"image set {path}: expected an .npz file, a directory of images or digits:SPLIT")
    with np.load(path) as data:
        if "arr_0" not in data.files:
            raise EvalError(f"{path} has no arr_0 (images [N, H, W, 3] uint8); it holds {', '.join(data.files)}")
        images = data["arr_0"]
        labels = data["arr_1"] if "arr_1" in data.files else None
    return _check_images(images, path), (labels.reshape(-1).astype(np.int64) if labels is not None else None)


def _check_images(images: np.ndarray, where: str) -> np.ndarray:
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise EvalError(f"{where}: images must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
    if len(images) < 2:
        raise EvalError(f"{where}: need at least 2 images for feature statistics, got {len(images)}")
    return images


def _load_dir(path: str) -> np.ndarray:
    from PIL import Image

    files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise EvalError(f"directory {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    arrays = []
    for f in files:
        with Image.open(f) as im:
            arrays.append(np.asarray(im.convert("RGB")))
    if len({a.shape for a in arrays}) != 1:
        raise EvalError(f"directory {path}: images differ in size ({sorted({a.shape for a in arrays})[:2]} ...)")
    return _check_images(np.stack(arrays), path)


def load_reference_stats(path: str) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Precomputed (mu, sigma) from an .npz with `mu` and `sigma` but no `arr_0`, else None."""
    if not (path.endswith(".npz") and os.path.isfile(path)):
        return None
    with np.load(path) as data:
        if "arr_0" in data.files or not {"mu", "sigma"} <= set(data.files):
            return None
        return data["mu"], data["sigma"]


# ----------------------------------------------------------------------------- Inception / FID


def _device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return torch.device("cpu") if acc.device_name() == "cpu" else torch.device(acc.device_name(0))


@torch.no_grad()
def inception_features(images: np.ndarray, model=None, weights: Optional[str] = None, batch_size: int = 50,
                       device: Optional[torch.device] = None) -> np.ndarray:
    """2048-d pool features [N, 2048] (float64) of uint8 RGB images [N, H, W, 3]. `model` gets float32
    [N, 3, H, W] batches with values 0..255 (the FID network resizes and normalises them itself)."""
    from .inception import load_fid_inception

    device = device or _device()
    model = model if model is not None else load_fid_inception(weights, device)
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).to(device)
        x = x.permute(0, 3, 1, 2).float()  # 0..255, as the TF FID graph takes them
        out.append(model(x).double().cpu().numpy())
    return np.concatenate(out)


def fid(generated: np.ndarray, reference: np.ndarray | Tuple[np.ndarray, np.ndarray], weights: Optional[str] = None,
        batch_size: int = 50, model=None) -> float:
    """FID between uint8 image sets (reference may be precomputed (mu, sigma))."""
    from .inception import load_fid_inception

    model = model if model is not None else load_fid_inception(weights, _device())
    device = next(model.parameters()).device
    gen = feature_stats(inception_features(generated, model, batch_size=batch_size, device=device))
    if isinstance(reference, tuple):
        ref = reference
    else:
        ref = feature_stats(inception_features(reference, model, batch_size=batch_size, device=device))
    return frechet_distance(*gen, *ref)


# ----------------------------------------------------------------------------- digits demo


def digits_accuracy(images: np.ndarray, labels: np.ndarray, classifier=None) -> float:
    """Share of uint8 digit images [N, H, W, 3] that the held-out-trained classifier assigns to
    their conditioning label [N]. classifier: a DigitsClassifier, a cache path, or None (default)."""
    from . import digits_classifier as dc

    return dc.accuracy(images, labels, _classifier(classifier))


def digits_fd(images: np.ndarray, reference: Optional[np.ndarray] = None, classifier=None) -> float:
    """Frechet distance in the digit classifier's features between uint8 images [N, H, W, 3] and a
    reference set (default: the real `digits:train` split at the images' resolution)."""
    from . import digits_classifier as dc

    net = _classifier(classifier)
    if reference is None:
        reference, _ = dc.real_digits("train", images.shape[1])
    return fd_from_features(dc.features(images, net), dc.features(reference, net))


def _classifier(classifier):
    from . import digits_classifier as dc

    if classifier is None or isinstance(classifier, str):
        return dc.load_classifier(classifier)
    return classifier


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    from .cli import OneLineParser

    p = OneLineParser(prog="mdt-eval", description="Frechet distances (Inception FID, digits FD) and digit accuracy "
                                              "of a generated image set against a reference set.")
    p.add_argument("generated", help="generated images: .npz (arr_0 images, arr_1 labels) or a directory of images")
    p.add_argument("reference", nargs="?", default=None,
                   help="reference images: .npz (arr_0, or precomputed mu/sigma), a directory, or digits:train / "
                        "digits:heldout (default for the digits metrics: digits:train)")
    p.add_argument("--metrics", default="fid", help=f"comma-separated, from {', '.join(METRICS)} (default fid)")
    p.add_argument("--inception", default=None,
                   help="FID Inception weights (pt_inception-2015-12-05-6726825d.pth; default $MDT_INCEPTION_WEIGHTS)")
    p.add_argument("--digits-classifier", default=None,
                   help="digit classifier cache file (default $MDT_CACHE_DIR or ~/.cache/masked-diffusion-trainer; "
                        "trained there on first use)")
    p.add_argument("--batch-size", type=int, default=50, help="Inception batch size")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")
    return p


def evaluate(generated: str, reference: Optional[str], metrics: Sequence[str], inception: Optional[str] = None,
             digits_classifier: Optional[str] = None, batch_size: int = 50) -> Dict[str, float]:
    """The CLI's work as a function: {metric: value} plus counts."""
    from .inception import InceptionWeightsError, load_fid_inception

    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise EvalError(f"unknown metric {unknown[0]!r}: choose from {', '.join(METRICS)}")
    model = None
    if "fid" in metrics:
        if reference is None:
            raise EvalError("fid needs a reference set (second argument)")
        try:
            model = load_fid_inception(inception, _device())  # fail on missing weights before any work
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


def main(argv: Optional[List[str]] = None) -> int:
    """mdt-eval: print one `name: value` line per metric (and JSON with --json)."""
    args = _parser().parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    try:
        results = evaluate(args.generated, args.reference, metrics, args.inception, args.digits_classifier,
                           args.batch_size)
    except EvalError as err:
        print(f"mdt-eval: error: {err}", file=sys.stderr)
        return 2
    for name in metrics:
        value = results[name]
        print(f"{name}: {value:.2%}" if name == "digits_acc" else f"{name}: {value:.4f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
