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
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import IO, Any, Callable, Iterator

import numpy as np
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls

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
                  flipped: np.ndarray | None = None, features: np.ndarray | None = None,
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


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_FILE_TYPES = (b"0", b"\0", b"7")  # regular and contiguous files


def _tar_number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for values that do not fit in octal
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _read_exact(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EOFError(f"tar data truncated ({len(data)} of {size} bytes)")
    return data


def _pax_records(data: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "replace")
        pos += length
    return records


def iter_tar_files(stream: IO[bytes], want: Callable[[str], bool] | None = None
                   ) -> Iterator[tuple[str, bytes | None]]:
    """Yield ``(name, data)`` for every regular file of a tar stream (``data`` None when
    ``want(name)`` is false: skipped without copying).

    A small reader instead of ``tarfile``: header parsing dominated loader time, and shards
    are plain ustar. PAX ``path``/``size`` records and GNU long names are honoured; damage
    raises ValueError (bad header checksum) or EOFError (truncation, missing end marker).
    """
    long_name, pax_size = None, None
    while True:
        header = stream.read(_BLOCK)
        if len(header) < _BLOCK:
            raise EOFError("tar stream ends without an end-of-archive block")
        if header == _ZERO_BLOCK:
            return
        expected = _tar_number(header[148:156])
        unsigned = sum(header[:148]) + sum(header[156:]) + 8 * 32
        if expected != unsigned and expected != unsigned - 256 * sum(b >= 128 for b in header):
            raise ValueError("tar header checksum mismatch")
        size = pax_size if pax_size is not None else _tar_number(header[124:136])
        kind = header[156:157]
        padded = size + (-size % _BLOCK)
        if kind in (b"x", b"g", b"L", b"K"):
            data = _read_exact(stream, padded)[:size]
            if kind == b"x":
                pax = _pax_records(data)
                long_name = pax.get("path", long_name)
                pax_size = int(pax["size"]) if "size" in pax else None
            elif kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8")
            continue
        name = long_name
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix and header[257:262] == b"ustar":
                name = prefix.decode("utf-8") + "/" + name
        long_name, pax_size = None, None
        if kind in _FILE_TYPES and (want is None or want(name)):
            data = _read_exact(stream, padded)[:size] if padded != size else _read_exact(stream, size)
            yield name, data
        else:
            if padded:
                _read_exact(stream, padded)
            if kind in _FILE_TYPES:
                yield name, None


def iter_tar_samples(stream: IO[bytes], fields: frozenset[str] | None = None
                     ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {field: bytes})`` from a tar stream, in stream order.

    Only members whose field is in ``fields`` are read (``None``: all). Damaged tar data
    raises (ValueError, EOFError, OSError); the caller decides whether that is fatal.
    """
    key, group = None, {}
    want = None if fields is None else (lambda name: split_member_name(name)[1] in fields)
    for name, data in iter_tar_files(stream, want):
        member_key, field_name = split_member_name(name)
        if member_key != key:
            if key is not None:
                yield key, group
            key, group = member_key, {}
        if data is not None:
            group[field_name] = data
    if key is not None:
        yield key, group


@dataclass
class ShardInfo:
    """One shard as listed in the manifest."""

    name: str
    samples: int
    bytes: int
    sha256: str
    first_index: int = 0
    end_index: int = 0


@dataclass
class Manifest:
    """The dataset description written last as ``manifest.json``.

    latent: the LatentSpec as a dict (shape, moments, dtype).
    scaling_factor: multiply latents by this before training (0.18215 SD VAE, 1.0 pixels).
    encoder: {"kind": "vae"|"pixels", "id": path or hub id}.
    source: {"spec": ..., "num_images": ..., "class_names": [...] or None}.
    """

    latent: dict[str, Any]
    scaling_factor: float
    encoder: dict[str, Any]
    source: dict[str, Any]
    resolution: int
    has_flip: bool
    num_classes: int
    num_samples: int
    shards: list[ShardInfo]
    settings: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    features: dict[str, Any] | None = None
    """Teacher features, when stored: teacher (id, kind), shape [D, G, G], dtype, fields, and the
    projection (file, sha256, source width, fit images) when reduced; None: no features."""
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    @property
    def spec(self) -> LatentSpec:
        """The LatentSpec every sample must match."""
        return LatentSpec(tuple(self.latent["shape"]), tuple(self.latent["moments"]),
                          self.latent["dtype"])

    @property
    def feature_spec(self) -> ArraySpec | None:
        """The ArraySpec of every stored feature array, or None without features."""
        if not self.features:
            return None
        return ArraySpec(tuple(self.features["shape"]), self.features.get("dtype", LATENT_DTYPE))

    def to_json(self) -> str:
        """Serialise deterministically (sorted keys) so reruns give identical manifests."""
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "manifest") -> "Manifest":
        """Parse and validate a manifest dict; raise DataToolsError naming the bad key."""
        if data.get("format") != FORMAT_NAME:
            raise DataToolsError(f"{where}: not an {FORMAT_NAME} manifest (format={data.get('format')!r})")
        if data.get("version") != FORMAT_VERSION:
            raise DataToolsError(f"{where}: unsupported version {data.get('version')!r} (want {FORMAT_VERSION})")
        try:
            shards = [ShardInfo(**s) for s in data["shards"]]
            kwargs = {k: data[k] for k in ("latent", "scaling_factor", "encoder", "source",
                                           "resolution", "has_flip", "num_classes", "num_samples")}
        except KeyError as exc:
            raise DataToolsError(f"{where}: missing key {exc}") from None
        except TypeError as exc:
            raise DataToolsError(f"{where}: bad shard entry ({exc})") from None
        features = data.get("features")
        if features is not None and not (isinstance(features, dict) and isinstance(features.get("shape"), list)
                                         and len(features["shape"]) == 3):
            raise DataToolsError(f"{where}: features must name a [D, G, G] shape, got {features!r}"[:300])
        manifest = cls(shards=shards, settings=data.get("settings", {}),
                       fingerprint=data.get("fingerprint", ""), features=features, **kwargs)
        total = sum(s.samples for s in shards)
        if total != manifest.num_samples:
            raise DataToolsError(f"{where}: num_samples {manifest.num_samples} != sum over shards {total}")
        return manifest

    @classmethod
    def load(cls, path: str) -> "Manifest":
        """Read a manifest from a local path or any URL webdataset's gopen understands."""
        try:
            if os.path.exists(path) or "://" not in path and not path.startswith("pipe:"):
                with open(path, "rb") as handle:
                    raw = handle.read()
            else:
                with gopen(path, "rb") as handle:
                    raw = handle.read()
            data = json.loads(raw)
        except (OSError, ValueError) as exc:
            raise DataToolsError(f"cannot read manifest {path}: {exc}") from None
        return cls.from_dict(data, where=path)


def manifest_location(shards: str | list[str], manifest: str | None = None) -> str:
    """Where the manifest of a dataset given as a directory, a manifest path, or a brace pattern /
    ``::``-joined list / ``pipe:`` URL / list of shards is (``manifest`` when given; for patterns,
    beside the first local shard). Derived files, such as cached FID statistics, go beside it."""
    if manifest:
        return manifest
    if isinstance(shards, str) and os.path.isdir(shards):
        return os.path.join(shards, MANIFEST_NAME)
    if isinstance(shards, str) and shards.endswith(".json"):
        return shards
    urls = [u for item in ([shards] if isinstance(shards, str) else shards) for u in expand_urls(item)]
    if urls and os.path.isfile(urls[0]):
        return os.path.join(os.path.dirname(urls[0]), MANIFEST_NAME)
    raise DataToolsError(f"no manifest for shards {str(shards)[:120]}: pass manifest=PATH "
                         "(it gives latent shape, scaling factor and classes)")


def resolve_shards(shards: str | list[str], manifest: str | None = None) -> tuple[list[str], Manifest]:
    """Shard URLs and the manifest for a dataset directory, a manifest path, a brace pattern /
    ``::``-joined list / ``pipe:`` URL, or a list of those."""
    if isinstance(shards, str) and (shards.endswith(".json") or os.path.isdir(shards)):
        path = manifest_location(shards)
        man = Manifest.load(path)
        root = os.path.dirname(path)
        return [os.path.join(root, s.name) for s in man.shards], man
    urls = [u for item in ([shards] if isinstance(shards, str) else shards) for u in expand_urls(item)]
    path = manifest_location(shards, manifest)
    if not os.path.exists(path) and "://" not in path and not path.startswith("pipe:"):
        raise DataToolsError(f"no manifest for shards {str(shards)[:120]}: pass manifest=PATH "
                             "(it gives latent shape, scaling factor and classes)")
    return urls, Manifest.load(path)


def find_manifest(path: str) -> str:
    """Return the manifest path for a dataset directory or a manifest path."""
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise DataToolsError(f"no {MANIFEST_NAME} at {path} (encoding unfinished, or wrong directory?)")
    return path


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` so readers see either the old file or the complete new one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str, obj: Any) -> None:
    """Atomically write ``obj`` as sorted JSON."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")
