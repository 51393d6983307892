"""What one reader of the latent stream does: read its shards in a seeded order, decode and check
each sample (skipping bad ones with a warning naming shard and key), build batches and draw their
posterior noise; and the life of the DataLoader workers that run the readers. The loader that
splits the shards and places a resumed stream is trainer.training.data."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import random
import signal
import sys
import time
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen

from data_tools.format import CLS_FIELD, FEATURE_FIELD, FEATURE_FLIP_FIELD, FLIP_FIELD, LATENT_FIELD, FastArrayDecoder
from data_tools.manifest import Manifest
from data_tools.tar_reader import iter_tar_samples

from .batch import Batch, Draws, LoaderOptions

# The loader's warnings keep one logger name, whichever module of the stream gives them.
log = logging.getLogger("trainer.training.data")
_READ_FIELDS = frozenset([LATENT_FIELD, FLIP_FIELD, CLS_FIELD])


class _Sample(NamedTuple):
    """One decoded sample on its way into a batch."""

    latent: np.ndarray
    label: int
    key: str
    flip: bool
    features: np.ndarray | None


class ShardReader(IterableDataset):
    """One pass of a rank's readers; each DataLoader worker builds its own batches and yields
    ``(Batch, worker, skipped)``: the worker's cumulative count of skipped samples rides along so
    the rank can sum them (a batch with no samples is only that report)."""

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

    def __iter__(self) -> Iterator[tuple[Batch, int, int]]:
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
        decode = FastArrayDecoder(self.spec)
        decode_features = FastArrayDecoder(self.feature_spec) if self.feature_spec is not None else None
        samples: list[_Sample] = []
        made = 0
        for url, key, fields in self._shuffled(self._samples(self.urls[reader::workers], rng), rnd):
            flip = self.use_flip and rnd.random() < 0.5
            got = self._decode(url, key, fields, flip, decode, decode_features)
            if got is None:
                continue
            samples.append(_Sample(got[0], got[1], key, flip, got[2]))
            if len(samples) == self.opts.batch_size:
                if made >= done:
                    yield self._emit(samples, eps_seed, made, worker)
                else:
                    self.base = self.skipped  # delivered before the checkpoint, skips counted then
                samples, made = [], made + 1
                if quota is not None and made >= quota:
                    break
        else:
            if samples and not self.opts.drop_last:
                yield self._emit(samples, eps_seed, made, worker)
        if self.skipped - self.base != self.reported:  # skips after the last batch still count
            yield self._emit([], eps_seed, made, worker)

    def _emit(self, samples: list[_Sample], eps_seed: int, index: int, worker: int) -> tuple[Batch, int, int]:
        """Batch ``index`` of this reader from its samples, with the worker and its skip count."""
        self.reported = self.skipped - self.base
        if not samples:
            return Batch(torch.empty(0), torch.empty(0, dtype=torch.long)), worker, self.reported
        z, eps = self._batch([s.latent for s in samples], eps_seed, index)
        batch = Batch(z, torch.tensor([s.label for s in samples], dtype=torch.long))
        if self.feature_spec is not None:
            batch.features = torch.from_numpy(np.stack([s.features for s in samples]))  # float16 [B, D, G, G]
        if self.opts.return_keys:
            batch.keys = [s.key for s in samples]
        if self.opts.return_draws:
            batch.draws = Draws(torch.tensor([s.flip for s in samples], dtype=torch.bool), eps)
        return batch, worker, self.reported


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def leave_stop_signals_to_the_rank(worker_id: int) -> None:
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


