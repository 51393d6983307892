"""``manifest.json``: the dataset description written last, how to find it for a dataset given as
a directory, a manifest path or shard URLs, and the file hash it records for each shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls

from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LATENT_DTYPE,
    MANIFEST_NAME,
    ArraySpec,
    DataToolsError,
    LatentSpec,
)


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
    def from_dict(cls, data: dict[str, Any], where: str = "manifest") -> Manifest:
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
    def load(cls, path: str) -> Manifest:
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
    """Hex sha256 of a file, read in chunks: the checksum the manifest and the journal record for
    each shard (and for the feature projection)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
