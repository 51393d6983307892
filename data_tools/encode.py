"""Encode a source into latent shards: parallel by slices, resumable, manifest written last.

The source (N images) is cut into ``num_parts`` contiguous slices; part ``p`` writes shards
``{prefix}-p{p:04d}-{k:06d}.tar`` with webdataset's ShardWriter, so parallel writers never share
a file name. Each shard is written to ``NAME.tmp``, renamed when complete and then recorded in
``_journal/NAME.json`` (count, bytes, sha256, source index range). A rerun keeps the longest
prefix of recorded shards whose hashes still match, deletes the rest and continues from there;
shard boundaries depend only on the sample sequence, so the result is byte-identical to an
uninterrupted run. The process that completes the last part writes ``manifest.json``.
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

import torch
from torch.utils.data import DataLoader, Dataset
from webdataset import ShardWriter

from .format import (
    FEATURE_FIELD,
    FEATURE_FLIP_FIELD,
    FEATURE_PROJECTION,
    FLIP_FIELD,
    LATENT_DTYPE,
    LATENT_FIELD,
    MANIFEST_NAME,
    TAR_WRITER_OPTIONS,
    DataToolsError,
    Manifest,
    ShardInfo,
    encode_sample,
    make_key,
    sha256_file,
    write_json_atomic,
    write_text_atomic,
)
from .sources import Source, center_crop_resize, open_source
from .teacher import Projection, Teacher, fit_projection, projection_path
from .vae import DEFAULT_VAE, build_encoder, pick_device

JOURNAL_DIR = "_journal"
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


def part_range(total: int, part: int, num_parts: int) -> tuple[int, int]:
    """Contiguous [lo, hi) slice of the source owned by ``part``."""
    return total * part // num_parts, total * (part + 1) // num_parts


def shard_name(prefix: str, part: int, index: int) -> str:
    """File name of shard ``index`` of ``part`` (unique per writer)."""
    return f"{prefix}-p{part:04d}-{index:06d}.tar"


def _record_path(out: str, name: str) -> str:
    return os.path.join(out, JOURNAL_DIR, name[: -len(".tar")] + ".json")


def _read_record(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def valid_records(out: str, prefix: str, part: int, fingerprint: str, lo: int,
                  rehash: bool = True) -> list[dict]:
    """Records of the longest valid prefix of this part's shards (read-only).

    A shard counts when its record has our fingerprint, continues the previous index range, and
    the file has the recorded size (and hash, with ``rehash``).
    """
    records: list[dict] = []
    expect = lo
    while True:
        name = shard_name(prefix, part, len(records))
        rec = _read_record(_record_path(out, name))
        path = os.path.join(out, name)
        if not (rec and rec.get("fingerprint") == fingerprint and rec.get("first_index") == expect
                and os.path.isfile(path) and os.path.getsize(path) == rec.get("bytes")):
            break
        if rehash and sha256_file(path) != rec.get("sha256"):
            break
        records.append(rec)
        expect = rec["end_index"]
    return records


def recover_part(out: str, prefix: str, part: int, fingerprint: str, lo: int) -> list[dict]:
    """Keep this part's verified shard prefix and delete everything after it, including any
    ``.tmp`` left by a crash, so a partial shard can never be listed. Only the owner of the
    part may call this."""
    records = valid_records(out, prefix, part, fingerprint, lo, rehash=True)
    pattern = re.compile(rf"^{re.escape(prefix)}-p{part:04d}-(\d+)\.(tar|tar\.tmp|json)$")
    for folder in (out, os.path.join(out, JOURNAL_DIR)):
        for entry in os.listdir(folder) if os.path.isdir(folder) else []:
            match = pattern.match(entry)
            if match and (int(match.group(1)) >= len(records) or match.group(2) == "tar.tmp"):
                os.remove(os.path.join(folder, entry))
    return records


def image_tensor(source: Source, index: int, resolution: int) -> tuple[torch.Tensor, int, str]:
    """Source image ``index`` as the encoders see it: uint8 [3, R, R] (centre crop and resize), its
    label and name."""
    image, label, name = source.load(index)
    return torch.from_numpy(center_crop_resize(image, resolution)).permute(2, 0, 1), label, name


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


class _PartWriter:
    """Wraps ShardWriter: shards go to NAME.tmp, then rename, hash and journal record."""

    def __init__(self, out: str, prefix: str, part: int, start_shard: int, first_index: int,
                 settings: EncodeSettings, meta: dict):
        self.out, self.meta, self.first, self.end = out, meta, first_index, first_index
        self.count, self.handle = 0, None
        pattern = os.path.join(out, f"{prefix}-p{part:04d}-%06d.tar")
        self.writer = ShardWriter(pattern, maxcount=settings.shard_size, maxsize=settings.shard_bytes,
                                  post=self._post, start_shard=start_shard, verbose=0,
                                  opener=self._open, **TAR_WRITER_OPTIONS)

    def _open(self, fname: str):
        self.handle = open(fname + ".tmp", "wb")
        return self.handle

    def _post(self, fname: str) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(fname + ".tmp", fname)
        name = os.path.basename(fname)
        record = dict(self.meta, name=name, samples=self.count, bytes=os.path.getsize(fname),
                      sha256=sha256_file(fname), first_index=self.first, end_index=self.end)
        write_json_atomic(_record_path(self.out, name), record)
        self.first, self.count = self.end, 0

    def write(self, index: int, sample: dict) -> None:
        """Write one sample; a shard closed by this call ends just before ``index``."""
        self.end = index
        self.writer.write(sample)
        self.count += 1

    def close(self, end_index: int) -> None:
        """Close the last shard, which covers the source up to ``end_index``."""
        self.end = end_index
        self.writer.close()

    def abort(self) -> None:
        """Drop the shard being written (after an error): never renamed, never recorded."""
        if self.handle is not None and not self.handle.closed:
            self.writer.tarstream.close()  # ends the tar stream so nothing writes to it later
            self.handle.close()
            os.remove(self.handle.name)


class FeatureMaker:
    """The teacher's (projected) features of image batches, as stored: float16 [B, D, G, G]."""

    def __init__(self, settings: EncodeSettings, source: Source, teacher: Teacher, encoder):
        """Fit (or read the dataset's) projection when settings.features_dim asks for one."""
        self.teacher = teacher
        self.grid = settings.feature_grid(encoder.latent_shape(settings.resolution)[1])
        self.projection: Projection | None = None
        if settings.features_dim:
            path = projection_path(settings.out)
            if not os.path.exists(path):
                _fit_and_save(settings, source, teacher, self.grid, path)
            self.projection = Projection.load(path)
            want = _fitted_on(settings, source, teacher, self.grid)
            if self.projection.fitted_on != want or self.projection.dim != settings.features_dim:
                raise DataToolsError(f"{path} was fitted for {self.projection.fitted_on!r} with "
                                     f"{self.projection.dim} channels, not {want!r} with {settings.features_dim}: "
                                     "delete it to re-encode with these settings")

    @property
    def shape(self) -> list[int]:
        """The stored shape [D, G, G]."""
        return [self.projection.dim if self.projection else self.teacher.dim, self.grid, self.grid]

    def __call__(self, images: torch.Tensor):
        """uint8 [B, 3, H, W] -> float16 numpy [B, D, G, G]."""
        features = self.teacher.features(images, self.grid)
        if self.projection is not None:
            features = self.projection.apply(features)
        return features.numpy().astype("float16")


def _fitted_on(settings: EncodeSettings, source: Source, teacher: Teacher, grid: int) -> str:
    """What a projection depends on besides its width: teacher, source, resolution, grid, fit size."""
    return (f"teacher={teacher.id} source={source.fingerprint()} resolution={settings.resolution} grid={grid} "
            f"fit={settings.features_fit}")


def _fit_and_save(settings: EncodeSettings, source: Source, teacher: Teacher, grid: int, path: str) -> None:
    """Fit the PCA on the features of features_fit evenly spaced source images and save it."""
    count = min(settings.features_fit, len(source))
    picks = sorted({i * len(source) // count for i in range(count)})
    batches = []
    for start in range(0, len(picks), settings.batch_size):
        chunk = picks[start:start + settings.batch_size]
        images = [image_tensor(source, index, settings.resolution)[0] for index in chunk]
        batches.append(teacher.features(torch.stack(images), grid))
    projection = fit_projection(torch.cat(batches), settings.features_dim, _fitted_on(settings, source, teacher, grid))
    projection.save(path)
    if settings.progress:
        print(f"[encode] feature projection {teacher.dim} -> {settings.features_dim} channels fitted on "
              f"{len(picks)} images ({100 * projection.explained:.1f}% of the variance): {path}",
              file=sys.stderr, flush=True)


def encode_part(settings: EncodeSettings, part: int = 0, num_parts: int = 1,
                source: Source | None = None, encoder=None, teacher: "FeatureMaker | None" = None) -> int:
    """Encode (or finish encoding) slice ``part`` of ``num_parts``; return samples in the slice's
    shards. Writes the manifest when this was the last unfinished part."""
    settings.validate()
    if not 0 <= part < num_parts:
        raise DataToolsError(f"--part {part} is outside 0..{num_parts - 1}")
    source = source or open_source(settings.source, settings.limit)
    fingerprint = settings.fingerprint(source, num_parts)
    lo, hi = part_range(len(source), part, num_parts)
    os.makedirs(os.path.join(settings.out, JOURNAL_DIR), exist_ok=True)
    records = recover_part(settings.out, settings.prefix, part, fingerprint, lo)
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
        _encode_range(settings, source, encoder, teacher, part, lo, hi, resume, len(records), fingerprint, label)
    elif settings.progress:
        print(f"[{label}] already complete ({len(records)} shards)", file=sys.stderr, flush=True)
    if not finalize(settings, num_parts, source, quiet=not settings.progress) and settings.progress:
        print(f"[{label}] done; the last part to finish writes the manifest", file=sys.stderr, flush=True)
    records = valid_records(settings.out, settings.prefix, part, fingerprint, lo, rehash=False)
    return sum(r["samples"] for r in records)


def _encode_range(settings: EncodeSettings, source: Source, encoder, teacher: FeatureMaker | None, part: int,
                  lo: int, hi: int, resume: int, start_shard: int, fingerprint: str, label: str) -> None:
    threads = torch.get_num_threads()
    if getattr(encoder, "device", torch.device("cpu")).type == "cpu" and settings.loader_workers:
        # A CPU encoder shares the cores with its image workers; oversubscribed OpenMP threads
        # spin and made a 2-core run 15x slower.
        torch.set_num_threads(max(1, threads - settings.loader_workers))
    try:
        _encode_batches(settings, source, encoder, teacher, part, lo, hi, resume, start_shard, fingerprint, label)
    finally:
        torch.set_num_threads(threads)


def _encode_batches(settings: EncodeSettings, source: Source, encoder, teacher: FeatureMaker | None, part: int,
                    lo: int, hi: int, resume: int, start_shard: int, fingerprint: str, label: str) -> None:
    bs = settings.batch_size
    # Restart on the batch grid of the slice so every batch has the same members as in an
    # uninterrupted run (batched kernels need not give bitwise equal results for other groupings).
    first = lo + (resume - lo) // bs * bs
    loader = DataLoader(_ImageSlice(source, range(first, hi), settings.resolution), batch_size=bs,
                        num_workers=settings.loader_workers, shuffle=False)
    meta = dict(fingerprint=fingerprint, latent_shape=list(encoder.latent_shape(settings.resolution)),
                moments=list(encoder.moments), scaling_factor=encoder.scaling_factor,
                encoder_kind=encoder.kind, encoder_id=encoder.id)
    if teacher is not None:
        meta.update(feature_shape=teacher.shape, teacher_id=teacher.teacher.id, teacher_dim=teacher.teacher.dim)
    writer = _PartWriter(settings.out, settings.prefix, part, start_shard, resume, settings, meta)
    progress = Progress(label, hi - lo, resume - lo, settings.progress)
    try:
        skipped = _write_batches(settings, source, encoder, teacher, loader, writer, progress, resume, label)
    except BaseException:
        writer.abort()
        raise
    writer.close(hi)
    progress.update(0, final=True)
    if skipped:
        print(f"[{label}] warning: {skipped} unreadable images left out", file=sys.stderr, flush=True)


def _write_batches(settings: EncodeSettings, source: Source, encoder, teacher: FeatureMaker | None,
                   loader: DataLoader, writer: _PartWriter, progress: Progress, resume: int, label: str) -> int:
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
                print(f"[{label}] warning: skipped image {index}: {errors[j]}", file=sys.stderr)
                skipped += 1
                continue
            sample = encode_sample(make_key(index), moments[j], int(labels[j]),
                                   {"index": index, "name": names[j]},
                                   flipped[j] if flipped is not None else None,
                                   feats[j] if feats is not None else None,
                                   feats_flip[j] if feats_flip is not None else None)
            writer.write(index, sample)
        progress.update(sum(1 for i in indices.tolist() if i >= resume))
    return skipped


def collect_parts(settings: EncodeSettings, num_parts: int, source: Source) -> list[list[dict]] | None:
    """All parts' records when every part is complete, else None (no rehash: cheap)."""
    fingerprint = settings.fingerprint(source, num_parts)
    parts = []
    for part in range(num_parts):
        lo, hi = part_range(len(source), part, num_parts)
        records = valid_records(settings.out, settings.prefix, part, fingerprint, lo, rehash=False)
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
        features=_features_entry(settings, head, flips),
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


def _features_entry(settings: EncodeSettings, head: dict, flips: bool) -> dict | None:
    """The manifest's record of the stored teacher features (None without)."""
    if not settings.features:
        return None
    entry = dict(teacher=dict(kind=Teacher.kind, id=head["teacher_id"], path=settings.features),
                 shape=head["feature_shape"], dtype=LATENT_DTYPE, teacher_dim=head["teacher_dim"],
                 fields=[FEATURE_FIELD] + ([FEATURE_FLIP_FIELD] if flips else []), projection=None)
    if settings.features_dim:
        path = projection_path(settings.out)
        entry["projection"] = dict(file=FEATURE_PROJECTION, sha256=sha256_file(path), kind="pca",
                                   fit_images=settings.features_fit, explained=Projection.load(path).explained)
    return entry


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
