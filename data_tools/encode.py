"""Encode a source into latent shards: parallel by slices, resumable, manifest written last.

The source (N images) is cut into ``num_parts`` contiguous slices; part ``p`` writes its own
shards with webdataset's ShardWriter, so parallel writers never share a file name. Every complete
shard is recorded in the journal (``encode_journal.py``); a rerun keeps the longest prefix of
recorded shards whose hashes still match, deletes the rest and continues from there. Shard
boundaries depend only on the sample sequence, so the result is byte-identical to an
uninterrupted run. The process that completes the last part writes ``manifest.json``. Teacher
features (``--features``) come from ``encode_features.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .atomic import write_text_atomic
from .encode_features import FeatureMaker, features_entry
from .encode_journal import JOURNAL_DIR, PartWriter, part_range, recover_part, valid_records
from .format import FLIP_FIELD, LATENT_DTYPE, LATENT_FIELD, MANIFEST_NAME, DataToolsError, encode_sample, make_key
from .manifest import Manifest, ShardInfo
from .sources import Source, image_tensor, open_source
from .teacher import Teacher
from .vae import DEFAULT_VAE, build_encoder, pick_device

_PREFIX_OK = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass
class EncodeSettings:
    """Everything that decides the content of the shards (plus a few speed knobs)."""

    source: str
    """Source spec: digits, folder:DIR or tars:PATTERN."""
    out: str
    """Output directory for shards, journal and manifest."""
    resolution: int = 256
    """Square side after centre crop and resize."""
    encoder: str = "vae"
    """vae or pixels."""
    vae: str = DEFAULT_VAE
    """Local diffusers AutoencoderKL directory or hub id (cache only without internet)."""
    scaling_factor: float | None = None
    """Override the VAE config's scaling factor."""
    hflip: bool | None = None
    """Also store the latent of the horizontally flipped image; None: only when the source says a
    mirror keeps the class (not for digits)."""
    shard_size: int = 1000
    """Maximum samples per shard (ShardWriter maxcount)."""
    shard_bytes: float = 1e9
    """Maximum payload bytes per shard (ShardWriter maxsize)."""
    batch_size: int = 32
    """Images per encoder call."""
    loader_workers: int = 2
    """Image decoding processes per encoding process."""
    limit: int | None = None
    """Encode only this many evenly spaced images of the source."""
    prefix: str = "latents"
    """Shard file name prefix."""
    skip_bad_images: bool = False
    """Leave unreadable images out (with a warning) instead of stopping."""
    progress: bool = True
    """Print progress lines with samples/s."""
    features: str | None = None
    """Teacher for representation alignment: a local transformers ViT directory (DINOv2, or the
    digits teacher of `mdt-data teacher`); its patch features are stored per sample."""
    features_dim: int | None = None
    """Reduce the features to this many channels by a PCA fitted once (None: the teacher's width)."""
    features_fit: int = 256
    """Images (evenly spaced over the source) whose features fit the PCA."""
    features_grid: int | None = None
    """Side of the stored feature grid; None: the latent side / 2 (the tokens of a patch-2 model)."""

    def validate(self) -> None:
        """Raise DataToolsError naming the first bad setting."""
        checks = [("resolution", self.resolution >= 8), ("shard_size", self.shard_size >= 1),
                  ("shard_bytes", self.shard_bytes > 0), ("batch_size", self.batch_size >= 1),
                  ("loader_workers", self.loader_workers >= 0), ("features_fit", self.features_fit >= 1),
                  ("features_dim", self.features_dim is None or self.features_dim >= 1),
                  ("features_grid", self.features_grid is None or self.features_grid >= 1)]
        for name, ok in checks:
            if not ok:
                raise DataToolsError(f"--{name.replace('_', '-')} has an invalid value {getattr(self, name)!r}")
        if not _PREFIX_OK.match(self.prefix):
            raise DataToolsError(f"--prefix {self.prefix!r} must match [A-Za-z0-9_-]+")
        for name in ("features_dim", "features_grid"):
            if getattr(self, name) is not None and not self.features:
                raise DataToolsError(f"--{name.replace('_', '-')} needs --features TEACHER")

    def feature_grid(self, latent_side: int) -> int:
        """The stored feature grid's side."""
        return self.features_grid or max(1, latent_side // 2)

    def store_flip(self, source: Source) -> bool:
        """Whether flipped latents are stored: the explicit setting, else the source's mirror_safe."""
        return self.hflip if self.hflip is not None else bool(getattr(source, "mirror_safe", True))

    def fingerprint(self, source: Source, num_parts: int) -> str:
        """Hash of everything that changes shard bytes; records with another one are redone."""
        keys = {k: v for k, v in asdict(self).items()
                if k not in ("out", "batch_size", "loader_workers", "progress", "skip_bad_images")}
        keys.update(source_fp=source.fingerprint(), num_parts=num_parts, hflip=self.store_flip(source))
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:20]


class _ImageSlice(Dataset):
    """Loads and preprocesses source images by index (runs in DataLoader workers)."""

    def __init__(self, source: Source, indices: range, resolution: int):
        self.source, self.indices, self.resolution = source, indices, resolution

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        try:
            image, label, name = image_tensor(self.source, index, self.resolution)
            return image, label, index, name, ""
        except Exception as exc:  # any decoder error: reported (or skipped) by the main process
            blank = torch.zeros(3, self.resolution, self.resolution, dtype=torch.uint8)
            return blank, -1, index, str(index), f"{type(exc).__name__}: {exc}"


class Progress:
    """Throttled progress lines: done/total, samples/s and ETA (one line per interval)."""

    def __init__(self, label: str, total: int, done: int = 0, enabled: bool = True, every: float = 5.0):
        """Start the clock; ``done`` samples were already there (resumed)."""
        self.label, self.total, self.done, self.enabled, self.every = label, total, done, enabled, every
        self.start_done, self.start = done, time.monotonic()
        self.last = self.start

    def update(self, n: int, final: bool = False) -> None:
        """Count ``n`` more samples and print a line when due."""
        self.done += n
        now = time.monotonic()
        if not self.enabled or not (final or now - self.last >= self.every):
            return
        self.last = now
        rate = (self.done - self.start_done) / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / max(self.total, 1)
        print(f"[{self.label}] {self.done}/{self.total} ({pct:.1f}%) {rate:.1f} samples/s"
              f" eta {eta:.0f}s", file=sys.stderr, flush=True)


def encode_part(settings: EncodeSettings, part: int = 0, num_parts: int = 1, *,
                source: Source | None = None, encoder: Any = None, teacher: FeatureMaker | None = None) -> int:
    """Encode (or finish encoding) slice ``part`` of ``num_parts``; return samples in the slice's
    shards. Writes the manifest when this was the last unfinished part."""
    settings.validate()
    if not 0 <= part < num_parts:
        raise DataToolsError(f"--part {part} is outside 0..{num_parts - 1}")
    source = source or open_source(settings.source, settings.limit)
    fingerprint = settings.fingerprint(source, num_parts)
    lo, hi = part_range(len(source), part, num_parts)
    os.makedirs(os.path.join(settings.out, JOURNAL_DIR), exist_ok=True)
    records = recover_part(settings.out, settings.prefix, part, fingerprint=fingerprint, lo=lo)
    resume = records[-1]["end_index"] if records else lo
    label = f"encode part {part}/{num_parts}"
    if resume < hi:
        manifest = os.path.join(settings.out, MANIFEST_NAME)
        if os.path.exists(manifest):
            os.remove(manifest)  # shards are about to change: no manifest until all are complete
        encoder = encoder or build_encoder(settings.encoder, settings.vae, settings.scaling_factor,
                                           int(os.environ.get("LOCAL_RANK", part)))
        if settings.features and teacher is None:
            device, dtype = pick_device(int(os.environ.get("LOCAL_RANK", part)))
            teacher = FeatureMaker(settings, source, Teacher(settings.features, device, dtype), encoder)
        if settings.progress and records:
            print(f"[{label}] resuming at image {resume - lo} of {hi - lo} ({len(records)} shards kept)",
                  file=sys.stderr, flush=True)
        _encode_range(_PartJob(settings=settings, source=source, encoder=encoder, teacher=teacher, part=part,
                               lo=lo, hi=hi, resume=resume, start_shard=len(records), fingerprint=fingerprint,
                               label=label))
    elif settings.progress:
        print(f"[{label}] already complete ({len(records)} shards)", file=sys.stderr, flush=True)
    if not finalize(settings, num_parts, source, quiet=not settings.progress) and settings.progress:
        print(f"[{label}] done; the last part to finish writes the manifest", file=sys.stderr, flush=True)
    records = valid_records(settings.out, settings.prefix, part, fingerprint=fingerprint, lo=lo, rehash=False)
    return sum(r["samples"] for r in records)


@dataclass(frozen=True)
class _PartJob:
    """What the steps of encoding one part share: the part's source slice [lo, hi), where it
    resumes (image ``resume``, shard ``start_shard``) and the encoders."""

    settings: EncodeSettings
    source: Source
    encoder: Any
    teacher: FeatureMaker | None
    part: int
    lo: int
    hi: int
    resume: int
    start_shard: int
    fingerprint: str
    label: str


def _encode_range(job: _PartJob) -> None:
    """Encode the job's images [resume, hi) with the torch thread count fitted to the loader."""
    threads = torch.get_num_threads()
    if getattr(job.encoder, "device", torch.device("cpu")).type == "cpu" and job.settings.loader_workers:
        # A CPU encoder shares the cores with its image workers; oversubscribed OpenMP threads
        # spin and made a 2-core run 15x slower.
        torch.set_num_threads(max(1, threads - job.settings.loader_workers))
    try:
        _encode_batches(job)
    finally:
        torch.set_num_threads(threads)


def _encode_batches(job: _PartJob) -> None:
    """Load, encode and write the job's images; a shard left open by an error is dropped."""
    settings, bs = job.settings, job.settings.batch_size
    # Restart on the batch grid of the slice so every batch has the same members as in an
    # uninterrupted run (batched kernels need not give bitwise equal results for other groupings).
    first = job.lo + (job.resume - job.lo) // bs * bs
    loader = DataLoader(_ImageSlice(job.source, range(first, job.hi), settings.resolution), batch_size=bs,
                        num_workers=settings.loader_workers, shuffle=False)
    encoder, teacher = job.encoder, job.teacher
    meta = dict(fingerprint=job.fingerprint, latent_shape=list(encoder.latent_shape(settings.resolution)),
                moments=list(encoder.moments), scaling_factor=encoder.scaling_factor,
                encoder_kind=encoder.kind, encoder_id=encoder.id)
    if teacher is not None:
        meta.update(feature_shape=teacher.shape, teacher_id=teacher.teacher.id, teacher_dim=teacher.teacher.dim)
    writer = PartWriter(settings.out, settings.prefix, job.part, start_shard=job.start_shard,
                        first_index=job.resume, max_count=settings.shard_size, max_bytes=settings.shard_bytes,
                        meta=meta)
    progress = Progress(job.label, job.hi - job.lo, job.resume - job.lo, settings.progress)
    try:
        skipped = _write_batches(job, loader, writer, progress)
    except BaseException:
        writer.abort()
        raise
    writer.close(job.hi)
    progress.update(0, final=True)
    if skipped:
        print(f"[{job.label}] warning: {skipped} unreadable images left out", file=sys.stderr, flush=True)


def _write_batches(job: _PartJob, loader: DataLoader, writer: PartWriter, progress: Progress) -> int:
    """Encode every batch and write its samples from image ``resume`` on; return how many
    unreadable images were left out."""
    settings, source, encoder, teacher, resume = job.settings, job.source, job.encoder, job.teacher, job.resume
    skipped = 0
    for images, labels, indices, names, errors in loader:
        moments = encoder.encode(images)
        flips = settings.store_flip(source)
        flipped = encoder.encode(images.flip(3)) if flips else None
        feats = teacher(images) if teacher is not None else None
        feats_flip = teacher(images.flip(3)) if teacher is not None and flips else None
        for j, index in enumerate(indices.tolist()):
            if index < resume:
                continue
            if errors[j]:
                if not settings.skip_bad_images:
                    raise DataToolsError(f"cannot read image {index} of {source.spec}: {errors[j]}"
                                         " (pass --skip-bad-images to leave such images out)")
                print(f"[{job.label}] warning: skipped image {index}: {errors[j]}", file=sys.stderr)
                skipped += 1
                continue
            sample = encode_sample(make_key(index), moments[j], int(labels[j]),
                                   meta={"index": index, "name": names[j]},
                                   flipped=flipped[j] if flipped is not None else None,
                                   features=feats[j] if feats is not None else None,
                                   features_flip=feats_flip[j] if feats_flip is not None else None)
            writer.write(index, sample)
        progress.update(sum(1 for i in indices.tolist() if i >= resume))
    return skipped


def collect_parts(settings: EncodeSettings, num_parts: int, source: Source) -> list[list[dict]] | None:
    """All parts' records when every part is complete, else None (no rehash: cheap)."""
    fingerprint = settings.fingerprint(source, num_parts)
    parts = []
    for part in range(num_parts):
        lo, hi = part_range(len(source), part, num_parts)
        records = valid_records(settings.out, settings.prefix, part, fingerprint=fingerprint, lo=lo,
                                rehash=False)
        if (records[-1]["end_index"] if records else lo) != hi:
            return None
        parts.append(records)
    return parts


def finalize(settings: EncodeSettings, num_parts: int, source: Source | None = None,
             quiet: bool = False) -> bool:
    """Write manifest.json atomically if every part is complete; return whether it was written."""
    source = source or open_source(settings.source, settings.limit)
    parts = collect_parts(settings, num_parts, source)
    if parts is None:
        return False
    records = [r for recs in parts for r in recs]
    if not records:
        raise DataToolsError(f"source {source.spec} produced no samples")
    head = records[0]
    flips = settings.store_flip(source)
    shards = [ShardInfo(**{k: r[k] for k in ("name", "samples", "bytes", "sha256", "first_index",
                                            "end_index")}) for r in records]
    manifest = Manifest(
        features=features_entry(settings, head, flips),
        latent=dict(shape=head["latent_shape"], moments=head["moments"], dtype=LATENT_DTYPE,
                    fields=[LATENT_FIELD] + ([FLIP_FIELD] if flips else [])),
        scaling_factor=head["scaling_factor"],
        encoder=dict(kind=head["encoder_kind"], id=head["encoder_id"]),
        source=dict(spec=source.spec, num_images=len(source), class_names=source.class_names),
        resolution=settings.resolution, has_flip=flips, num_classes=source.num_classes,
        num_samples=sum(s.samples for s in shards), shards=shards, fingerprint=head["fingerprint"],
        settings={k: v for k, v in asdict(settings).items() if k not in ("out", "progress")}
        | {"num_parts": num_parts, "hflip": flips},
    )
    write_text_atomic(os.path.join(settings.out, MANIFEST_NAME), manifest.to_json())
    if not quiet:
        print(f"[encode] wrote {os.path.join(settings.out, MANIFEST_NAME)}: {len(shards)} shards, "
              f"{manifest.num_samples} samples", file=sys.stderr, flush=True)
    return True


def run_local_pool(child_args: list[str], procs: int, part_offset: int, num_parts: int) -> None:
    """Run ``procs`` encoder processes (``python -m data_tools encode ... --part i``) and wait.

    Subprocesses rather than a multiprocessing pool: each gets a clean interpreter and its own
    accelerator index, and nothing has to be pickled between them.
    """
    threads = max(1, (os.cpu_count() or 1) // procs)
    children = []
    for i in range(procs):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), LOCAL_RANK=str(i))
        argv = [sys.executable, "-m", "data_tools", "encode", *child_args,
                "--part", str(part_offset + i), "--num-parts", str(num_parts)]
        children.append(subprocess.Popen(argv, env=env))
    codes = [child.wait() for child in children]
    failed = [part_offset + i for i, code in enumerate(codes) if code != 0]
    if failed:
        raise DataToolsError(f"encoder part(s) {failed} failed (see messages above); rerun the same command to resume")
