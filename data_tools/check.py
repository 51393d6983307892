"""``inspect`` (manifest summary + latent statistics) and ``verify`` (re-read every shard)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np

from .format import (
    CLS_FIELD,
    FEATURE_FIELD,
    FEATURE_FLIP_FIELD,
    FLIP_FIELD,
    LATENT_FIELD,
    DataToolsError,
    FastArrayDecoder,
)
from .manifest import Manifest, ShardInfo, find_manifest, sha256_file
from .tar_reader import iter_tar_samples


def summarize(manifest: Manifest, where: str) -> list[str]:
    """Human-readable lines describing a manifest."""
    spec = manifest.spec
    total_bytes = sum(s.bytes for s in manifest.shards)
    src = manifest.source
    return [
        f"dataset     {where}",
        f"source      {src.get('spec')} ({src.get('num_images')} images, {manifest.num_classes} classes)",
        f"encoder     {manifest.encoder.get('kind')} ({manifest.encoder.get('id')}), "
        f"scaling factor {manifest.scaling_factor:g}",
        f"latent      {'x'.join(map(str, spec.shape))} {spec.dtype}, moments {','.join(spec.moments)}, "
        f"flipped copy: {'yes' if manifest.has_flip else 'no'}",
        f"resolution  {manifest.resolution}",
        *_feature_lines(manifest),
        f"samples     {manifest.num_samples} in {len(manifest.shards)} shards "
        f"({manifest.num_samples / max(1, len(manifest.shards)):.1f} per shard, {total_bytes / 2**20:.1f} MiB)",
    ]


def latent_stats(manifest: Manifest, root: str, samples: int = 256, seed: int = 0) -> np.ndarray:
    """Per-channel mean and std of ``(mean + std * eps) * scaling_factor`` over the first
    ``samples`` samples; returns an array ``[C, 2]``."""
    rng = np.random.default_rng(seed)
    decode = FastArrayDecoder(manifest.spec)
    chunks: list[np.ndarray] = []
    for shard in manifest.shards:
        with open(os.path.join(root, shard.name), "rb") as stream:
            for _, fields in iter_tar_samples(stream, frozenset([LATENT_FIELD])):
                chunks.append(decode(fields[LATENT_FIELD]).astype(np.float32))
                if len(chunks) >= samples:
                    break
        if len(chunks) >= samples:
            break
    if not chunks:
        raise DataToolsError(f"{root}: no samples to inspect")
    stacked = np.stack(chunks)  # [N, K, C, H, W]
    z = stacked[:, 0]
    if stacked.shape[1] > 1:
        z = z + stacked[:, 1] * rng.standard_normal(z.shape, dtype=np.float32)
    z = z * manifest.scaling_factor
    per_channel = z.transpose(1, 0, 2, 3).reshape(z.shape[1], -1)
    return np.stack([per_channel.mean(1), per_channel.std(1)], axis=1)


def inspect_dataset(path: str, samples: int = 256) -> str:
    """The report ``mdt-data inspect`` prints."""
    manifest_path = find_manifest(path)
    manifest = Manifest.load(manifest_path)
    root = os.path.dirname(os.path.abspath(manifest_path))
    lines = summarize(manifest, manifest_path)
    stats = latent_stats(manifest, root, samples)
    n = min(samples, manifest.num_samples)
    lines.append(f"latent statistics over {n} samples, z = (mean + std * eps) * {manifest.scaling_factor:g}:")
    lines.append("  channel      mean       std")
    for c, (mean, std) in enumerate(stats):
        lines.append(f"  {c:7d} {mean:9.4f} {std:9.4f}")
    lines.append(f"  overall std {float(np.sqrt((stats[:, 1] ** 2).mean())):.4f}"
                 " (near 1 when the scaling factor fits the data)")
    return "\n".join(lines)


@dataclass
class ShardReport:
    """Problems found in one shard (empty list: fine)."""

    name: str
    problems: list[str] = field(default_factory=list)


def _feature_lines(manifest: Manifest) -> list[str]:
    f = manifest.features
    if not f:
        return ["features    none"]
    shape = "x".join(map(str, f["shape"]))
    proj = f.get("projection")
    reduced = (f", PCA from {f.get('teacher_dim')} channels ({100 * proj.get('explained', 0):.1f}% of the variance, "
               f"fitted on {proj.get('fit_images')} images)") if proj else ""
    per_image = 2 * int(np.prod(f["shape"])) * len(f.get("fields", [FEATURE_FIELD]))
    return [f"features    {f['teacher'].get('id')}: {shape} {f.get('dtype')}{reduced}, "
            f"{per_image / 1024:.1f} KiB per image"]


def field_decoders(manifest: Manifest) -> dict[str, FastArrayDecoder]:
    """A decoder for every array field the manifest says each sample has."""
    latent = FastArrayDecoder(manifest.spec)
    out = {LATENT_FIELD: latent}
    if manifest.has_flip:
        out[FLIP_FIELD] = latent
    if manifest.feature_spec is not None:
        features = FastArrayDecoder(manifest.feature_spec)
        out[FEATURE_FIELD] = features
        if manifest.has_flip:
            out[FEATURE_FLIP_FIELD] = features
    return out


def verify_shard(root: str, shard: ShardInfo, manifest: Manifest, decoders: dict[str, FastArrayDecoder],
                 seen_keys: set[str]) -> ShardReport:
    """Check one shard: size, sha256, and every sample's fields, shapes, dtypes and label."""
    report = ShardReport(shard.name)
    path = os.path.join(root, shard.name)
    if not os.path.isfile(path):
        report.problems.append("missing file")
        return report
    if os.path.getsize(path) != shard.bytes:
        report.problems.append(f"size {os.path.getsize(path)} != {shard.bytes}")
    if sha256_file(path) != shard.sha256:
        report.problems.append("sha256 mismatch")
    count = 0
    try:
        with open(path, "rb") as stream:
            for key, fields in iter_tar_samples(stream):
                count += 1
                problem = _check_sample(key, fields, decoders, manifest.num_classes, seen_keys)
                if problem:
                    report.problems.append(f"sample {key}: {problem}")
    except Exception as exc:  # a damaged tar raises several types; all mean "bad shard"
        report.problems.append(f"unreadable after {count} samples ({type(exc).__name__}: {exc})")
    if count != shard.samples:
        report.problems.append(f"{count} samples, manifest says {shard.samples}")
    return report


def _check_sample(key: str, fields: dict[str, bytes], decoders: dict[str, FastArrayDecoder],
                  num_classes: int, seen_keys: set[str]) -> str | None:
    if key in seen_keys:
        return "duplicate key"
    seen_keys.add(key)
    missing = [f for f in [*decoders, CLS_FIELD] if f not in fields]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    for name, decode in decoders.items():
        try:
            array = decode(fields[name])
        except ValueError as exc:
            return f"{name}: {exc}"
        if not np.isfinite(array).all():
            return f"{name}: non-finite values"
    try:
        label = int(fields[CLS_FIELD].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return "cls is not an integer"
    if not 0 <= label < num_classes:
        return f"cls {label} outside 0..{num_classes - 1}"
    return None


def verify_dataset(path: str, progress: bool = True) -> list[ShardReport]:
    """Re-read every shard listed in the manifest; return the reports of bad shards."""
    manifest_path = find_manifest(path)
    manifest = Manifest.load(manifest_path)
    root = os.path.dirname(os.path.abspath(manifest_path))
    decoders = field_decoders(manifest)
    seen: set[str] = set()
    bad = []
    for i, shard in enumerate(manifest.shards):
        report = verify_shard(root, shard, manifest, decoders, seen)
        if report.problems:
            bad.append(report)
        if progress and (i + 1) % 100 == 0:
            print(f"[verify] {i + 1}/{len(manifest.shards)} shards, {len(bad)} bad", file=sys.stderr, flush=True)
    return bad
