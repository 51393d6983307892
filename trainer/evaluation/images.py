"""Image sets for evaluation: .npz (ADM layout), image directories, the built-in digits and MNIST."""

from __future__ import annotations

import os
from typing import Tuple

import numpy as np
from PIL import Image

from data_tools.format import DataToolsError

from .digits import DIGITS
from .errors import EvalError
from .judge import Judge
from .mnist import MNIST

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
BUILT_IN: dict[str, Judge] = {"digits": DIGITS, "mnist": MNIST}
"""The built-in image sets NAME:SPLIT, by the judge that knows their images."""


def load_images(path: str, resolution: int | None = None) -> Tuple[np.ndarray, np.ndarray | None]:
    """uint8 images [N, H, W, 3] and labels [N] (or None) from an .npz, an image directory,
    `digits:SPLIT` (real digits at `resolution`, default 8) or `mnist:SPLIT` (default 32)."""
    name, colon, split = path.partition(":")
    if colon and name in BUILT_IN:
        try:
            return BUILT_IN[name].real(split, resolution)
        except DataToolsError as err:
            raise EvalError(str(err)) from None
    if os.path.isdir(path):
        return _load_dir(path), None
    if not os.path.isfile(path):
        raise EvalError(f"image set {path} does not exist")
    if not path.endswith(".npz"):
        raise EvalError(f"image set {path}: expected an .npz file, a directory of images, "
                        "digits:SPLIT or mnist:SPLIT")
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


def load_reference_stats(path: str) -> Tuple[np.ndarray, np.ndarray] | None:
    """Precomputed (mu, sigma) from an .npz with `mu` and `sigma` but no `arr_0`, else None."""
    if not (path.endswith(".npz") and os.path.isfile(path)):
        return None
    with np.load(path) as data:
        if "arr_0" in data.files or not {"mu", "sigma"} <= set(data.files):
            return None
        return data["mu"], data["sigma"]
