"""Streaming loader: latent shards -> ``(z [B, C, H, W] float32, y [B] long)`` batches.

Shards are split by rank, then by DataLoader worker (each shard has exactly one reader). In the
default resampled mode every reader cycles through its shards in fresh random orders forever and
an epoch is a fixed number of steps (``epoch_samples // (world_size * batch_size)``), identical on
every rank, so uneven shards can never make ranks disagree on the step count.

Every random choice (shard order, shuffle buffer, flip) comes from
``SeedSequence([seed, rank, reader, epoch])`` and the posterior noise of batch ``n`` from
``(..., n)``. Batch ``i`` of an epoch is always made by reader ``i % workers``; a run resumed from
``state_dict()`` at batch ``b`` lets DataLoader worker ``j`` play reader ``(j + b) % workers``,
which re-reads its part of the epoch without building the batches already delivered and then
continues, so the resumed stream is the uninterrupted one, batch for batch.

Bad input (unreadable or truncated shard, missing field, wrong shape or dtype, bad label) is
skipped with a warning naming shard and key and counted in ``LatentLoader.skipped``; batches
keep their shape.

``LoaderOptions.features`` adds the teacher's features of each sample (``feat.npy``, or
``feat_flip.npy`` when the flipped latent was drawn) as float16 ``[B, D, G, G]`` right after ``y``.

``LoaderOptions.return_draws`` makes every batch carry what was drawn for it (``Draws``: the flip
choices and the exact noise), so tests can recompute ``z`` from the stored moments; training
leaves it off.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import math
import multiprocessing
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
from deepspeed.accelerator import get_accelerator
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen

from data_tools.format import (
    CLS_FIELD,
    FEATURE_FIELD,
    FEATURE_FLIP_FIELD,
    FLIP_FIELD,
    LATENT_FIELD,
    DataToolsError,
    FastArrayDecoder,
    Manifest,
    iter_tar_samples,
    resolve_shards,
)

from ..config import ConfigError, DataConfig

log = logging.getLogger(__name__)
_READ_FIELDS = frozenset([LATENT_FIELD, FLIP_FIELD, CLS_FIELD])


@dataclass
class LoaderOptions:
    """Options of the latent stream (all per rank unless said otherwise)."""

    batch_size: int
    """Samples per batch on this rank."""
    num_workers: int = 2
    """DataLoader worker processes (0: read in the main process)."""
    seed: int = 0
    """Base seed; combined with rank, reader (worker) and epoch."""
    resampled: bool = True
    """Infinite resampled stream with fixed-size epochs (training); False: each sample exactly
    once per epoch (evaluation; ranks may then see different batch counts)."""
    epoch_samples: int | None = None
    """Samples per epoch over all ranks (resampled mode); default: the manifest's sample count."""
    shuffle_buffer: int = 1000
    """Samples held per worker for shuffling (0 or 1: no shuffling beyond shard order)."""
    hflip: bool = True
    """Use the flipped latent with probability 1/2 when the dataset has one."""
    sample_posterior: bool = True
    """z = mean + std * eps; False: z = mean."""
    scaling_factor: float | None = None
    """Override the manifest's scaling factor."""
    drop_last: bool = False
    """Non-resampled mode: drop each worker's last partial batch."""
    pin_memory: bool | None = None
    """Pin host memory; default: on when the accelerator is not the CPU."""
    manifest: str | None = None
    """Manifest path or URL when ``shards`` is a pattern whose directory has none."""
    return_keys: bool = False
    """Yield (z, y, keys) instead of (z, y); for tests and evaluation."""
    return_draws: bool = False
    """Append a ``Draws`` (flip choices, noise) to every batch: (z, y[, keys], draws); for tests
    that recompute z from the shards. Off in training: the noise copy costs a batch of memory."""
    max_warnings: int = 20
    """Warnings logged per worker before they are only counted."""
    holdout_fraction: float = 0.0
    """Share of the shards (the last ones) held out from training for validation."""
    split: str = "train"
    """With holdout_fraction: 'train' reads the other shards, 'holdout' only the held-out ones."""
    features: bool = False
    """Also yield each sample's teacher features (representation alignment): (z, y, f, ...)."""


class Draws(NamedTuple):
    """What the stream drew for one batch (``LoaderOptions.return_draws``)."""

    flip: torch.Tensor
    """bool [B]: sample i was taken from its flipped latent (``latent_flip.npy``)."""
    eps: torch.Tensor | None
    """float32 [B, C, H, W]: the noise of ``z = (mean + std * eps) * scale``, exactly as used;
    None when no noise was drawn (single-moment data or ``sample_posterior=False``)."""


def check_shards(d: DataConfig, features: bool = False) -> None:
    """Before any process group starts: the configured shards (and held-out shards) resolve to a
    manifest and every local shard exists, and with features=True (align.lambda_align > 0) the
    training shards hold teacher features; ConfigError naming the key otherwise."""
    if not d.shards:
        raise ConfigError("data.shards is empty: point it at a directory made by `mdt-data encode`")
    for key, shards, manifest in (("data.shards", d.shards, d.manifest), ("data.val_shards", d.val_shards, None)):
        if not shards:
            continue
        try:
            urls, found = resolve_shards(shards, manifest)
        except (DataToolsError, OSError) as err:
            raise ConfigError(f"{key}: {err}") from None
        missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
        if missing:
            raise ConfigError(f"{key}: shard {missing[0]} does not exist")
        if features and key == "data.shards" and not found.features:
            raise ConfigError(f"align.lambda_align > 0 needs teacher features, but the shards of data.shards "
                              f"({shards}) hold none: encode them with `mdt-data encode --features TEACHER`")


class _ShardStream(IterableDataset):
    """One pass of a rank's readers; each DataLoader worker builds its own batches."""

    def __init__(self, urls: list[str], man: Manifest, opts: LoaderOptions, rank: int,
                 epoch: int, steps: int | None, start: int = 0):
        """``steps``: batches in the epoch (None: until the shards end); ``start``: batches of
        this epoch already delivered (resampled mode)."""
        super().__init__()
        self.urls, self.opts, self.rank, self.epoch, self.steps = urls, opts, rank, epoch, steps
        self.start = start
        self.spec, self.num_classes = man.spec, man.num_classes
        self.use_flip = opts.hflip and man.has_flip
        self.feature_spec = man.feature_spec if opts.features else None
        # only the fields this stream can use are kept from the tar (a flip's features only with flips)
        wanted = {FEATURE_FIELD} | ({FEATURE_FLIP_FIELD} if self.use_flip else set()) if opts.features else set()
        self.fields = _READ_FIELDS | wanted
        self.scale = float(opts.scaling_factor if opts.scaling_factor is not None else man.scaling_factor)
        self.skipped, self.warned, self.reported, self.base = 0, 0, 0, 0

    def _skip(self, url: str, key: str, reason: str) -> None:
        self.skipped += 1
        if self.warned < self.opts.max_warnings:
            self.warned += 1
            log.warning("skipped %s in %s: %s", key, url, reason)
            if self.warned == self.opts.max_warnings:
                log.warning("further bad-input warnings of this worker are only counted")

    def _read(self, url: str) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        last = None
        try:
            with gopen(url, "rb") as stream:
                for key, fields in iter_tar_samples(stream, self.fields):
                    last = key
                    yield url, key, fields
        except Exception as exc:  # damaged/truncated/missing shard: many exception types
            where = f"rest of shard after key {last}" if last else "whole shard"
            self._skip(url, where, f"unreadable ({type(exc).__name__}: {exc})")

    def _samples(self, urls: list[str], rng: np.random.Generator) -> Iterator[tuple[str, str, dict]]:
        while True:
            good = 0
            for i in rng.permutation(len(urls)):
                for item in self._read(urls[i]):
                    good += 1
                    yield item
            if not self.opts.resampled:
                return
            if good == 0:
                raise RuntimeError(f"rank {self.rank}: none of its {len(urls)} shards has a readable sample")

    def _shuffled(self, items: Iterator, rnd: random.Random) -> Iterator:
        size = self.opts.shuffle_buffer
        if size <= 1:
            yield from items
            return
        buf: list = []
        for item in items:
            if len(buf) < size:
                buf.append(item)
                continue
            i = rnd.randrange(size)
            buf[i], item = item, buf[i]
            yield item
        rnd.shuffle(buf)
        yield from buf

    def _decode(self, url: str, key: str, fields: dict[str, bytes], flip: bool, decode: FastArrayDecoder,
                decode_features: FastArrayDecoder | None) -> tuple[np.ndarray, int, np.ndarray | None] | None:
        """The chosen latent, the label and (when asked) the matching features, or None (skipped and
        counted) when anything is off."""
        name = FLIP_FIELD if flip else LATENT_FIELD
        names = [name, CLS_FIELD] + ([FEATURE_FLIP_FIELD if flip else FEATURE_FIELD] if decode_features else [])
        problem, latent, label, features = None, None, -1, None
        missing = [n for n in names if n not in fields]
        if missing:
            problem = f"missing field {missing[0]}"
        else:
            try:
                latent = decode(fields[name])
                if decode_features is not None:
                    features = decode_features(fields[names[2]])
            except ValueError as exc:
                problem = f"{names[2] if latent is not None else name}: {exc}"
            text = fields[CLS_FIELD][:20].decode("ascii", "replace").strip()
            label = int(text) if text.isdigit() else -1
            if problem is None and not 0 <= label < self.num_classes:
                problem = f"cls {text!r} is not a class index in 0..{self.num_classes - 1}"
        if problem is not None:
            self._skip(url, key, problem)
            return None
        return latent, label, features

    def _batch(self, arrays: list[np.ndarray], eps_seed: int, index: int
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """z of batch ``index`` and, with ``return_draws``, the noise it used (else None)."""
        moments = torch.from_numpy(np.stack(arrays))  # float16 [B, K, C, H, W]
        if moments.shape[1] > 1 and self.opts.sample_posterior:
            # Noise seeded per batch, so batches skipped on resume need not draw theirs.
            gen = torch.Generator().manual_seed(int(np.random.SeedSequence([eps_seed, index]).generate_state(1)[0]))
            # In place on the float32 noise (float16 operands promote inside the kernels): this
            # is the worker's main arithmetic cost per batch; so return_draws copies the noise
            # before it is overwritten.
            eps = torch.randn(moments[:, 0].shape, generator=gen)
            drawn = eps.clone() if self.opts.return_draws else None
            return eps.mul_(moments[:, 1]).add_(moments[:, 0]).mul_(self.scale), drawn
        return moments[:, 0].float().mul_(self.scale), None

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        reader, done, quota = worker, 0, None
        if self.steps is not None:
            reader = (worker + self.start) % workers
            done = (self.start - reader + workers - 1) // workers  # this reader's delivered batches
            quota = (self.steps - reader + workers - 1) // workers
            if done >= quota:
                return
        rng = np.random.default_rng(np.random.SeedSequence([self.opts.seed, self.rank, reader, self.epoch]))
        rnd = random.Random(int(rng.integers(2**63)))
        eps_seed = int(rng.integers(2**63))
        decode, bs = FastArrayDecoder(self.spec), self.opts.batch_size
        decode_features = FastArrayDecoder(self.feature_spec) if self.feature_spec is not None else None
        arrays, labels, keys, flips, feats, made = [], [], [], [], [], 0
        for url, key, fields in self._shuffled(self._samples(self.urls[reader::workers], rng), rnd):
            flip = self.use_flip and rnd.random() < 0.5
            got = self._decode(url, key, fields, flip, decode, decode_features)
            if got is None:
                continue
            arrays.append(got[0])
            labels.append(got[1])
            feats.append(got[2])
            keys.append(key)
            flips.append(flip)
            if len(arrays) == bs:
                if made >= done:
                    yield self._emit(arrays, labels, keys, flips, feats, eps_seed, made, worker)
                else:
                    self.base = self.skipped  # delivered before the checkpoint, skips counted then
                arrays, labels, keys, flips, feats, made = [], [], [], [], [], made + 1
                if quota is not None and made >= quota:
                    break
        else:
            if arrays and not self.opts.drop_last:
                yield self._emit(arrays, labels, keys, flips, feats, eps_seed, made, worker)
        if self.skipped - self.base != self.reported:  # skips after the last batch still count
            yield self._emit([], [], [], [], [], eps_seed, made, worker)

    def _emit(self, arrays, labels, keys, flips, feats, eps_seed, index, worker) -> tuple:
        # The worker's cumulative skip count rides along so the main process can sum it.
        self.reported = self.skipped - self.base
        z, eps = self._batch(arrays, eps_seed, index) if arrays else (torch.empty(0), None)
        out = (z, torch.tensor(labels, dtype=torch.long), worker, self.reported)
        if self.feature_spec is not None:
            out += (torch.from_numpy(np.stack(feats)) if feats else torch.empty(0),)  # float16 [B, D, G, G]
        if self.opts.return_keys:
            out += (list(keys),)
        if self.opts.return_draws:
            out += (Draws(torch.tensor(flips, dtype=torch.bool), eps),)
        return out


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _leave_stop_signals_to_the_rank(worker_id: int) -> None:
    """DataLoader workers ignore stop signals sent to the whole process group (Ctrl-C, scancel, the
    launcher's SIGTERM): the rank finishes its step and saves first, which needs its workers alive.
    Because they ignore SIGTERM, nothing but their rank may end them: on Linux the kernel kills
    them when the rank dies, however it dies (a parent-death signal), and a rank on its way out
    ends them itself (`end_data_workers`)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # no prctl: the rank's own clean-up still ends them
            pass
        parent = multiprocessing.parent_process()
        if parent is not None and os.getppid() != parent.pid:  # the rank died before the line above
            os._exit(1)


def end_data_workers(grace_s: float = 5.0) -> int:
    """End this process's data workers (they ignore SIGTERM, see above): wait up to `grace_s` for
    those already told to stop, then SIGKILL the rest. Call after the loaders' iterators are
    closed, on a rank's way out, so that its exit never waits on a worker. Returns how many had to
    be killed."""
    children = multiprocessing.active_children()  # joins (reaps) the finished ones, too
    deadline = time.monotonic() + grace_s
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
    killed = [c for c in children if c.is_alive()]
    for child in killed:
        child.kill()
        child.join(grace_s)
    return len(killed)


class LatentLoader:
    """Iterable over one epoch of ``(z, y)`` batches (``(z, y[, keys][, draws])`` with
    ``return_keys`` / ``return_draws``) from the current position; see module doc.

    ``skipped`` counts bad samples and unreadable shard parts; ``state_dict()`` /
    ``load_state_dict()`` carry the position for resuming; ``batches()`` never ends.
    """

    def __init__(self, urls: list[str], manifest: Manifest, rank: int, world_size: int, opts: LoaderOptions):
        """Split shards and check that every rank and worker has at least one."""
        if opts.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {opts.batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        readers = world_size * max(1, opts.num_workers)
        if len(urls) < readers:
            raise ValueError(f"{len(urls)} shards < {world_size} ranks x {max(1, opts.num_workers)} workers"
                             f" = {readers} readers: use fewer workers or re-encode with smaller --shard-size")
        if opts.features and manifest.feature_spec is None:
            raise ValueError("these shards hold no teacher features: encode them with `mdt-data encode --features "
                             "TEACHER` to align representations")
        self.manifest, self.opts, self.rank, self.world_size = manifest, opts, rank, world_size
        self.urls = urls[rank::world_size]
        self.steps_per_epoch: int | None = None
        if opts.resampled:
            epoch = opts.epoch_samples if opts.epoch_samples is not None else manifest.num_samples
            self.steps_per_epoch = epoch // (world_size * opts.batch_size)
            if self.steps_per_epoch < 1:
                raise ValueError(f"epoch of {epoch} samples < one step of {world_size} x {opts.batch_size}")
        self.samples_seen, self.epoch, self.batches_in_epoch, self._skipped = 0, 0, 0, 0
        self.pin_memory = self._pin()

    @property
    def skipped(self) -> int:
        """Bad samples / shard parts skipped by this rank so far (all workers)."""
        return self._skipped

    def __len__(self) -> int:
        """Steps per epoch (resampled mode only)."""
        if self.steps_per_epoch is None:
            raise TypeError("non-resampled LatentLoader has no fixed length")
        return self.steps_per_epoch

    def state_dict(self) -> dict[str, Any]:
        """The stream position to store in a checkpoint."""
        return dict(samples_seen=self.samples_seen, epoch=self.epoch,
                    batches_in_epoch=self.batches_in_epoch, skipped=self.skipped)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by ``state_dict()``."""
        self.samples_seen = int(state["samples_seen"])
        self.epoch = int(state.get("epoch", 0))
        self.batches_in_epoch = int(state.get("batches_in_epoch", 0))
        self._skipped = int(state.get("skipped", 0))

    def _pin(self) -> bool:
        if self.opts.pin_memory is not None or self.opts.num_workers == 0:
            return bool(self.opts.pin_memory)
        return get_accelerator().device_name() != "cpu"

    def __iter__(self) -> Iterator[tuple]:
        """Yield the rest of the current epoch, then advance the epoch counter."""
        opts = self.opts
        if opts.resampled:
            dataset = _ShardStream(self.urls, self.manifest, opts, self.rank, self.epoch,
                                   self.steps_per_epoch, self.batches_in_epoch)
            replay = 0
        else:
            # Readers of a finite epoch run out at different times, so the reader rotation does
            # not apply: replay the epoch's order and drop the batches already seen (exact too).
            dataset = _ShardStream(self.urls, self.manifest, opts, self.rank, self.epoch, None)
            replay = self.batches_in_epoch
        if opts.num_workers > 0:
            source = DataLoader(dataset, batch_size=None, num_workers=opts.num_workers,
                                pin_memory=self.pin_memory, persistent_workers=False,
                                worker_init_fn=_leave_stop_signals_to_the_rank)
        else:
            source = dataset
        latest: dict[int, int] = {}
        done = 0
        for z, y, worker, skipped, *extra in source:
            # Workers report cumulative skip counts; add the growth, except for replayed batches.
            grew = skipped - latest.get(worker, 0)
            latest[worker] = skipped
            if done >= replay:
                self._skipped += grew
            if len(y) == 0:  # a worker's final report, not a batch
                continue
            done += 1
            if done <= replay:
                continue
            self.samples_seen += len(y)
            self.batches_in_epoch += 1
            yield (z, y, *extra)  # extra: [features][, keys][, draws], as the options ask
        self.epoch += 1
        self.batches_in_epoch = 0

    def batches(self) -> Iterator[tuple]:
        """Endless batches across epochs (for step-based training loops)."""
        while True:
            yield from self


def split_holdout(urls: list[str], fraction: float, split: str) -> list[str]:
    """The shards of a split: the last ceil(fraction x N) shards are the held-out ones (at least one
    when fraction > 0, and at least one left for training)."""
    if split not in ("train", "holdout"):
        raise ValueError(f"split must be 'train' or 'holdout', got {split!r}")
    if fraction <= 0:
        if split == "holdout":
            raise ValueError("no held-out shards: set a holdout_fraction > 0")
        return urls
    held = min(len(urls) - 1, max(1, math.ceil(fraction * len(urls))))
    if held < 1:
        raise ValueError(f"{len(urls)} shard(s) cannot be split into training and held-out shards")
    return urls[len(urls) - held:] if split == "holdout" else urls[:len(urls) - held]


def build_latent_loader(shards: str | list[str], batch_size: int, rank: int = 0, world_size: int = 1,
                        **options: Any) -> LatentLoader:
    """The loader the trainer calls: ``shards`` is a dataset directory, manifest path, brace
    pattern, ``pipe:`` URL or list; ``options`` are LoaderOptions fields."""
    opts = LoaderOptions(batch_size=batch_size, **options)
    urls, manifest = resolve_shards(shards, opts.manifest)
    if opts.holdout_fraction > 0:
        kept = split_holdout(urls, opts.holdout_fraction, opts.split)
        counts = {s.name: s.samples for s in manifest.shards}
        names = [os.path.basename(u) for u in kept]
        if opts.epoch_samples is None and all(n in counts for n in names):  # an epoch of the split's samples
            opts = dataclasses.replace(opts, epoch_samples=sum(counts[n] for n in names))
        urls = kept
    return LatentLoader(urls, manifest, rank, world_size, opts)
