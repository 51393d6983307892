"""Evaluation inside the run (the `eval:` section): every eval.every steps, at the end of every
unmask-tuning phase and at the end of the run, from the EMA weights, spread over the ranks.

Measures the validation loss on held-out data at fixed noise levels, and on generated images the
digits Frechet distance and accuracy (digits data) and FID (against a reference file, or statistics
of the training shards computed once and cached beside the manifest), at each configured guidance
scale. Rank 0 writes every result to TensorBoard (`eval/...`) and appends one record per
evaluation to RUN_DIR/metrics.jsonl: step, images seen, training FLOPs and wall time so far,
accelerator hours, this evaluation's own wall time, and the metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from data_tools.format import Manifest, manifest_location, resolve_shards, write_text_atomic
from data_tools.vae import load_autoencoder
from model_zoo.inception import load_fid_inception

from ..config import TrainConfig
from ..config.phases import PhaseState
from ..distributed import DistInfo
from ..evaluation import digits
from ..evaluation.frechet import feature_stats, frechet_distance
from ..evaluation.history import METRICS_FILE, parse_metrics
from ..evaluation.images import load_images, load_reference_stats
from .checkpointer import RunState
from .data import LatentLoader, LoaderOptions, split_holdout
from .ema import EMA
from .eval_work import generate_features, latent_decoder, reference_features, validation_loss
from .monitor import Monitor
from .stop import RunStopped


def guided(name: str, scale: float) -> str:
    """A metric's name at a guidance scale: NAME at 1, NAME@gSCALE otherwise."""
    return name if scale == 1 else f"{name}@g{scale:g}"


def first_samples(urls: List[str], manifest: Manifest, count: int,
                  batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first `count` samples of the shards in a fixed order (no shuffling, no flips, the
    posterior mean): latents [N, C, H, W] as trained (scaled) and labels [N]."""
    opts = LoaderOptions(batch_size=batch_size, num_workers=0, resampled=False, shuffle_buffer=0, hflip=False,
                         sample_posterior=False)
    xs, ys, got = [], [], 0
    for z, y in LatentLoader(urls, manifest, 0, 1, opts):
        xs.append(z)
        ys.append(y)
        got += len(y)
        if got >= count:
            break
    if not xs:
        raise RunStopped(f"no readable samples in {urls[0]} ... ({len(urls)} shards)")
    return torch.cat(xs)[:count], torch.cat(ys)[:count]


class Evaluator:
    """The run's evaluations: `due` says when, `run` measures (every rank) and reports (rank 0)."""

    def __init__(self, cfg: TrainConfig, dist_info: DistInfo, ema: EMA, manifest: Manifest, manifest_dir: str,
                 train_urls: List[str], val: Optional[Tuple[List[str], Manifest]], monitor: Monitor, resumed_step: int):
        self.cfg, self.dist, self.ema, self.manifest, self.monitor = cfg, dist_info, ema, manifest, monitor
        self.enabled = cfg.eval.every > 0
        self.seconds = 0.0
        self.path = os.path.join(cfg.run.run_dir(), METRICS_FILE)
        if not self.enabled:
            return
        e, device = cfg.eval, dist_info.device
        self.latent_shape = tuple(manifest.spec.shape)
        self.decoder = self._decoder()
        self.to_images = latent_decoder(manifest.scaling_factor, manifest.encoder, self.decoder)
        self.featurizers, self.references = {}, {}
        if "digits" in e.metrics:
            if not str(manifest.source.get("spec", "")).startswith("digits"):
                raise RunStopped(f"eval.metrics has digits, but the data are {manifest.source.get('spec')!r}, "
                                 "not the bundled digits")
            net = digits.load_classifier()
            self.featurizers["digits_feat"] = lambda images: digits.features(images, net)
            self.featurizers["digits_pred"] = lambda images: digits.predict(images, net)
            real, _ = digits.real_digits("train", manifest.resolution or self.latent_shape[-1])
            self.references["digits_fd"] = feature_stats(digits.features(real, net))
        if "fid" in e.metrics:
            try:
                inception = load_fid_inception(e.inception, device)
            except FileNotFoundError as err:  # InceptionWeightsError: one line naming the file
                raise RunStopped(f"eval.inception: {err}") from None
            self.featurizers["inception"] = lambda images: self._inception(inception, images)
            self.references["fid"] = self._fid_reference(inception, manifest_dir, train_urls)
        self.val = None
        if "val_loss" in e.metrics and val is not None:
            self.val = first_samples(val[0], val[1], e.val_samples, e.batch_size)
        if dist_info.rank == 0:
            keep_records_through(self.path, resumed_step)

    # ------------------------------------------------------------------------- when and what

    def rewind(self, step: int) -> None:
        """The run went back to `step` (a rollback): its records of later steps go, as on resume."""
        if self.enabled and self.dist.rank == 0:
            keep_records_through(self.path, step)

    def due(self, step: int, phase: PhaseState, last: bool) -> bool:
        """Whether to evaluate after the step just finished (1-based)."""
        return self.enabled and (step % self.cfg.eval.every == 0 or phase.phase_end or last)

    def final_missing(self, step: int) -> bool:
        """Whether a run that is at its end (resumed there, after a crash between its last save and
        its last evaluation) still lacks the final evaluation; rank 0's file decides for all."""
        if not self.enabled:
            return False
        missing = [True]
        if self.dist.rank == 0 and os.path.exists(self.path):
            with open(self.path) as f:
                missing[0] = not any(r.get("final") and r["step"] == step for r in parse_metrics(f.read(), self.path))
        if dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(missing, src=0)
        return missing[0]

    @torch.no_grad()
    def run(self, state: RunState, phase: str, final: bool) -> Dict[str, float]:
        """Evaluate the EMA weights on every rank; rank 0 logs and appends the record. Returns the metrics."""
        start = time.perf_counter()
        rank, world, device = self.dist.rank, self.dist.world_size, self.dist.device
        with self.ema.full() as net:  # under ZeRO-3 the average is gathered for the evaluation only
            metrics = self._measure(self.cfg.diffusion.denoiser(net), rank, world, device)
        seconds = time.perf_counter() - start
        self.seconds += seconds
        if rank == 0:
            self._report(state, phase, final, metrics, seconds)
        return metrics

    def _measure(self, denoiser: nn.Module, rank: int, world: int, device: torch.device) -> Dict[str, float]:
        e = self.cfg.eval
        metrics: Dict[str, float] = {}
        if self.val is not None:
            per_level = validation_loss(denoiser, self.val[0], self.val[1], e.val_sigmas, e.batch_size, rank, world,
                                        e.seed, device)
            metrics["val_loss"] = float(per_level.mean())
            metrics.update({f"val_loss/sigma={s:g}": float(v) for s, v in zip(e.val_sigmas, per_level)})
        for scale in e.guidance_scales if self.featurizers else []:
            features, labels = generate_features(denoiser, e.num_images, e.batch_size, rank, world, self.latent_shape,
                                                 self.manifest.num_classes, e.seed, e.sampler, e.steps, scale,
                                                 e.skip_cache, self.to_images, self.featurizers, device)
            if "digits_feat" in features:
                ref = self.references["digits_fd"]
                metrics[guided("digits_fd", scale)] = frechet_distance(*feature_stats(features["digits_feat"]), *ref)
                metrics[guided("digits_acc", scale)] = float((features["digits_pred"] == labels).mean())
            if "inception" in features:
                metrics[guided("fid", scale)] = frechet_distance(*feature_stats(features["inception"]),
                                                                 *self.references["fid"])
        return metrics

    # ------------------------------------------------------------------------- reporting

    def _report(self, state: RunState, phase: str, final: bool, metrics: Dict[str, float], seconds: float) -> None:
        world = self.dist.world_size
        share = self.seconds / max(self.seconds + state.train_seconds, 1e-9)
        record = {"step": state.step, "images_seen": state.images_seen, "train_flops": state.train_flops,
                  "train_seconds": state.train_seconds, "accelerator_hours": state.train_seconds * world / 3600,
                  "eval_seconds": seconds, "phase": phase, "final": final, "metrics": metrics}
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in metrics.items():
            self.monitor.scalar(f"eval/{name}", value, state.step)
        self.monitor.scalar("eval/seconds", seconds, state.step)
        self.monitor.scalar("eval/time_share", share, state.step)
        shown = " | ".join(f"{k} {v:.2%}" if "acc" in k else f"{k} {v:.4g}" for k, v in metrics.items()
                           if "/" not in k)
        print(f"eval step {state.step}: {shown} ({seconds:.1f}s, evaluation {share:.0%} of the wall time)",
              flush=True)

    # ------------------------------------------------------------------------- inputs

    def _decoder(self) -> Optional[nn.Module]:
        """The dataset's VAE for latent data (None for pixels)."""
        encoder = self.manifest.encoder or {}
        if encoder.get("kind") != "vae":
            return None
        try:
            vae = load_autoencoder(encoder.get("id", ""), torch.float32)
        except Exception as err:  # noqa: BLE001 - DataToolsError or a broken VAE: one line either way
            raise RunStopped(f"eval: cannot load the dataset's VAE {encoder.get('id')!r}: {err}") from None
        return vae.eval().requires_grad_(False).to(self.dist.device)

    @staticmethod
    def _inception(net: nn.Module, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(next(net.parameters()).device)
        return net(x.permute(0, 3, 1, 2).float()).double().cpu().numpy()

    def _fid_reference(self, inception: nn.Module, manifest_dir: str, train_urls: List[str]
                       ) -> Tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) for FID: from eval.fid_reference, else of the training samples, cached."""
        e = self.cfg.eval
        if e.fid_reference:
            stats = load_reference_stats(e.fid_reference)
            if stats is not None:
                return stats
            images, _ = load_images(e.fid_reference)
            return feature_stats(self._inception(inception, images))
        path = reference_stats_path(manifest_dir, self.manifest, e.fid_reference_images, e.inception)
        cached = [os.path.exists(path)]
        if dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(cached, src=0)  # every rank takes the same path
        if cached[0]:
            with np.load(path) as data:
                return data["mu"], data["sigma"]
        latents, _ = first_samples(train_urls, self.manifest, e.fid_reference_images, e.batch_size)
        feats = reference_features(latents, e.batch_size, self.dist.rank, self.dist.world_size, self.to_images,
                                   lambda images: self._inception(inception, images), self.dist.device)
        mu, sigma = feature_stats(feats)
        if self.dist.rank == 0:
            try:
                tmp = f"{path}.tmp{os.getpid()}.npz"
                np.savez(tmp, mu=mu, sigma=sigma, count=len(feats))
                os.replace(tmp, path)
            except OSError as err:
                print(f"warning: cannot cache the FID reference statistics at {path} ({err}); they are "
                      "recomputed at every start", flush=True)
        return mu, sigma


def keep_records_through(path: str, step: int) -> None:
    """A resumed run evaluates again from its checkpoint at `step`: records of a lost attempt go
    from metrics.jsonl, and so does a last line cut short by a crash (RunStopped names any other
    bad line)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        try:
            records = parse_metrics(f.read(), path)
        except ValueError as err:
            raise RunStopped(str(err)) from None
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records if r["step"] <= step))


def reference_stats_path(manifest_dir: str, manifest: Manifest, count: int, weights: Optional[str]) -> str:
    """Where the FID statistics of `count` training samples are cached: beside the manifest, named
    by what they depend on (samples, data, decoding, the Inception weights file)."""
    weights = weights or os.environ.get("MDT_INCEPTION_WEIGHTS", "")
    size = os.path.getsize(weights) if weights and os.path.isfile(weights) else 0
    key = json.dumps([count, manifest.num_samples, manifest.scaling_factor, manifest.encoder,
                      os.path.basename(weights), size], sort_keys=True)
    return os.path.join(manifest_dir, f"fid_stats_n{count}_{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz")


def build_evaluator(cfg: TrainConfig, dist_info: DistInfo, ema: EMA, loader: LatentLoader, monitor: Monitor,
                    resumed_step: int) -> Evaluator:
    """The run's Evaluator with its data: the training shards (for FID reference statistics), the
    held-out ones (data.val_shards, or the data.val_fraction share held out from training)."""
    d = cfg.data
    if not cfg.eval.every:
        return Evaluator(cfg, dist_info, ema, loader.manifest, "", [], None, monitor, resumed_step)
    urls, manifest = resolve_shards(d.shards, d.manifest)
    holdout = 0.0 if d.val_shards else d.val_fraction
    train_urls = split_holdout(urls, holdout, "train") if holdout else urls
    val = None
    if d.val_shards:
        val = resolve_shards(d.val_shards)
    elif holdout:
        val = (split_holdout(urls, holdout, "holdout"), manifest)
    where = os.path.dirname(os.path.abspath(manifest_location(d.shards, d.manifest)))
    return Evaluator(cfg, dist_info, ema, manifest, where, train_urls, val, monitor, resumed_step)
