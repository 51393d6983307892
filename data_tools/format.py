"""The latent shard format, shared by the writer (data_tools.encode) and the reader
(trainer.training.data).

A dataset is a directory of uncompressed tar shards plus ``manifest.json``. Each sample is a
group of tar members ``<key>.<field>`` whose key has no dot (WebDataset ends a key at the first dot
of the base name, so a dotted key would merge samples):

- ``latent.npy``: float16 array ``[K, C, H, W]``; ``K`` indexes the stored posterior moments
  (``["mean", "std"]`` for a VAE, ``["mean"]`` for deterministic encoders such as ``pixels``).
- ``latent_flip.npy``: the same for the horizontally flipped image (only when the manifest says
  ``has_flip``).
- ``feat.npy`` / ``feat_flip.npy``: float16 ``[D, G, G]``, a frozen teacher's patch features of
  the image (and of its mirror, when the manifest says ``has_flip``) on a ``G x G`` token grid, only
  when the manifest has a ``features`` entry (``mdt-data encode --features TEACHER``). A mirror's
  features are the teacher's output on the mirrored image, not the mirrored grid: a ViT with
  position embeddings is not mirror-equivariant, and the flipped latents are stored the same way.
- ``cls``: the class index as ASCII text.
- ``json``: small metadata (source index and name), never needed for training.

Everything is plain ``.npy`` (``allow_pickle=False``), text or JSON: reading a shard never
executes code. The manifest is written last and atomically, so its presence means every shard
it lists is complete.

This module is the spec: names, constants, keys and the encoding of one sample. The manifest
lives in ``manifest.py``, the tar reader in ``tar_reader.py``.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

FORMAT_NAME = "mdt-latents"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LATENT_FIELD = "latent.npy"
FLIP_FIELD = "latent_flip.npy"
FEATURE_FIELD = "feat.npy"
FEATURE_FLIP_FIELD = "feat_flip.npy"
FEATURE_PROJECTION = "features_projection.npz"
CLS_FIELD = "cls"
META_FIELD = "json"
LATENT_DTYPE = "float16"
MOMENTS_VAE = ("mean", "std")
MOMENTS_DETERMINISTIC = ("mean",)
SD_VAE_SCALING_FACTOR = 0.18215

# Options for webdataset's TarWriter/ShardWriter: samples are already bytes, and a fixed mtime
# makes reruns byte-identical (a float mtime would also add a PAX header to every member).
TAR_WRITER_OPTIONS = {"encoder": False, "mtime": 0}

_KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+$")


class DataToolsError(Exception):
    """A user-facing error: the message is one line that names the culprit (no traceback)."""


def make_key(index: int) -> str:
    """Return the dot-free sample key for a source index (zero padded so keys sort by index)."""
    return f"s{index:09d}"


def check_key(key: str) -> None:
    """Raise ValueError unless ``key`` is a valid sample key (no dots, no slashes)."""
    if not _KEY_OK.match(key):
        raise ValueError(f"sample key {key!r} must match [A-Za-z0-9_-]+ (a dot would split it)")


def split_member_name(name: str) -> tuple[str, str]:
    """Split a tar member name into (key, field) the way WebDataset does: the key ends at the
    first dot of the base name."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


def encode_array(array: np.ndarray) -> bytes:
    """Serialise an array as ``.npy`` bytes (never pickled)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_array(data: bytes) -> np.ndarray:
    """Parse ``.npy`` bytes; object arrays are refused because they would need pickle."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def _misfit(array: np.ndarray, dtype: str, shape: tuple[int, ...]) -> str | None:
    """Why an array is not of this dtype and shape, or None."""
    if array.dtype != np.dtype(dtype):
        return f"dtype {array.dtype} != {dtype}"
    if tuple(array.shape) != shape:
        return f"shape {tuple(array.shape)} != {shape}"
    return None


@dataclass(frozen=True)
class LatentSpec:
    """What every stored latent looks like.

    shape: per-moment latent shape ``[C, H, W]``.
    moments: names of the stacked moments, e.g. ``("mean", "std")``.
    dtype: numpy dtype name of the stored arrays.
    """

    shape: tuple[int, int, int]
    moments: tuple[str, ...] = MOMENTS_VAE
    dtype: str = LATENT_DTYPE

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """Shape of one stored ``latent.npy``: ``[K, C, H, W]``."""
        return (len(self.moments), *self.shape)

    def check(self, array: np.ndarray) -> str | None:
        """Return why ``array`` does not fit this spec, or None when it does."""
        return _misfit(array, self.dtype, self.stored_shape)


@dataclass(frozen=True)
class ArraySpec:
    """Any other stored array of one known shape and dtype (teacher features: ``[D, G, G]``)."""

    shape: tuple[int, ...]
    dtype: str = LATENT_DTYPE

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape as stored."""
        return self.shape

    def check(self, array: np.ndarray) -> str | None:
        """Return why ``array`` does not fit this spec, or None when it does."""
        return _misfit(array, self.dtype, self.stored_shape)


class FastArrayDecoder:
    """Decodes ``.npy`` bytes of one known shape/dtype without re-parsing the header.

    Every latent of a dataset has byte-identical ``.npy`` headers, so comparing the header bytes
    checks shape and dtype at once; anything else falls back to ``np.load`` plus a check.
    """

    def __init__(self, spec: LatentSpec | ArraySpec):
        """Precompute the expected header for ``spec``."""
        self.spec = spec
        probe = encode_array(np.zeros(spec.stored_shape, dtype=spec.dtype))
        self.nbytes = int(np.prod(spec.stored_shape)) * np.dtype(spec.dtype).itemsize
        self.header = probe[: len(probe) - self.nbytes]

    def __call__(self, data: bytes) -> np.ndarray:
        """Return the array or raise ValueError naming what is wrong."""
        if len(data) == len(self.header) + self.nbytes and data.startswith(self.header):
            flat = np.frombuffer(data, dtype=self.spec.dtype, offset=len(self.header))
            return flat.reshape(self.spec.stored_shape)
        try:
            array = decode_array(data)
        except Exception as exc:  # np.load raises several types for damaged bytes
            raise ValueError(f"unreadable npy ({type(exc).__name__}: {exc})") from None
        problem = self.spec.check(array)
        if problem:
            raise ValueError(problem)
        return array


def encode_sample(key: str, latent: np.ndarray, label: int, meta: dict[str, Any] | None = None,
                  flipped: np.ndarray | None = None, *, features: np.ndarray | None = None,
                  features_flip: np.ndarray | None = None) -> dict[str, Any]:
    """Build the dict that webdataset's TarWriter stores (all values already bytes)."""
    check_key(key)
    sample: dict[str, Any] = {
        "__key__": key,
        LATENT_FIELD: encode_array(latent),
        CLS_FIELD: str(int(label)).encode("ascii"),
    }
    if flipped is not None:
        sample[FLIP_FIELD] = encode_array(flipped)
    if features is not None:
        sample[FEATURE_FIELD] = encode_array(features)
    if features_flip is not None:
        sample[FEATURE_FLIP_FIELD] = encode_array(features_flip)
    if meta is not None:
        sample[META_FIELD] = json.dumps(meta, sort_keys=True).encode("utf-8")
    return sample
