"""Streaming loader: latent shards -> ``Batch`` (latents float32 [B, C, H, W], labels long [B]).

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
``feat_flip.npy`` when the flipped latent was drawn) as ``Batch.features``, float16 ``[B, D, G, G]``.

``LoaderOptions.return_draws`` makes every batch carry what was drawn for it (``Batch.draws``: the
flip choices and the exact noise), so tests can recompute the latents from the stored moments;
training leaves it off. What one reader does is trainer.training.shard_reader.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Iterator

from deepspeed.accelerator import get_accelerator
from torch.utils.data import DataLoader

from data_tools.format import DataToolsError
from data_tools.manifest import Manifest, resolve_shards

from ..config import ConfigError, DataConfig
from .batch import Batch, LoaderOptions
from .shard_reader import ShardReader, leave_stop_signals_to_the_rank


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


class LatentLoader:
    """Iterable over one epoch of ``Batch``es from the current position; see module doc.

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

    def __iter__(self) -> Iterator[Batch]:
        """Yield the rest of the current epoch, then advance the epoch counter."""
        opts = self.opts
        if opts.resampled:
            dataset = ShardReader(self.urls, self.manifest, opts, self.rank, self.epoch,
                                  self.steps_per_epoch, self.batches_in_epoch)
            replay = 0
        else:
            # Readers of a finite epoch run out at different times, so the reader rotation does
            # not apply: replay the epoch's order and drop the batches already seen (exact too).
            dataset = ShardReader(self.urls, self.manifest, opts, self.rank, self.epoch, None)
            replay = self.batches_in_epoch
        if opts.num_workers > 0:
            source = DataLoader(dataset, batch_size=None, num_workers=opts.num_workers,
                                pin_memory=self.pin_memory, persistent_workers=False,
                                worker_init_fn=leave_stop_signals_to_the_rank)
        else:
            source = dataset
        latest: dict[int, int] = {}
        done = 0
        for batch, worker, skipped in source:
            # Workers report cumulative skip counts; add the growth, except for replayed batches.
            grew = skipped - latest.get(worker, 0)
            latest[worker] = skipped
            if done >= replay:
                self._skipped += grew
            if len(batch) == 0:  # a worker's final report, not a batch
                continue
            done += 1
            if done <= replay:
                continue
            self.samples_seen += len(batch)
            self.batches_in_epoch += 1
            yield batch
        self.epoch += 1
        self.batches_in_epoch = 0

    def batches(self) -> TimedBatches:
        """Endless batches across epochs (for step-based training loops), timed."""
        return TimedBatches(self._endless())

    def _endless(self) -> Iterator[Batch]:
        while True:
            yield from self


class TimedBatches:
    """An endless batch iterator that counts the seconds spent waiting for its batches: the share
    of a step the data stream costs (`waited()` hands the sum over and starts a new one)."""

    def __init__(self, batches: Iterator[Batch]):
        self._batches = batches
        self._waited = 0.0

    def __iter__(self) -> TimedBatches:
        return self

    def __next__(self) -> Batch:
        start = time.perf_counter()
        batch = next(self._batches)
        self._waited += time.perf_counter() - start
        return batch

    def waited(self) -> float:
        """Seconds waited for batches since the last call."""
        waited, self._waited = self._waited, 0.0
        return waited

    def close(self) -> None:
        """End the stream now (its data workers stop), not when the garbage collector gets to it."""
        self._batches.close()


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
