"""Evaluation inside the run (the `eval:` section): every eval.every steps, at the end of every
unmask-tuning phase and at the end of the run, from the EMA weights, spread over the ranks.

Measures the validation loss on held-out data at fixed noise levels, and on generated images the
digits or MNIST Frechet distance and accuracy (digits or MNIST data: their held-out judges) and
FID (against a reference file, or statistics of the training shards computed once and cached
beside the manifest), at each configured guidance scale. Rank 0 writes every result to
TensorBoard (`eval/...`) and appends one record per evaluation to RUN_DIR/metrics.jsonl: step,
images seen, training FLOPs and wall time so far, accelerator hours, this evaluation's own wall
time, and the metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from data_tools.atomic import write_text_atomic
from data_tools.manifest import Manifest, manifest_location, resolve_shards
from data_tools.vae import load_autoencoder
from model_zoo.inception import load_fid_inception

from ..checkpoints import RunState
from ..config import TrainConfig
from ..console import say, warn
from ..distributed import DistInfo
from ..evaluation.digits import DIGITS
from ..evaluation.frechet import feature_stats, frechet_distance
from ..evaluation.history import METRICS_FILE, parse_metrics
from ..evaluation.images import load_images, load_reference_stats
from ..evaluation.judge import Judge
from ..evaluation.mnist import MNIST
from ..evaluation.registry import MetricSpec, guided, in_groups, line_text
from ..sample.generate import SampleSettings
from .batch import LoaderOptions
from .data import LatentLoader, split_holdout
from .ema import EMA
from .eval_work import generate_features, latent_decoder, reference_features, validation_loss
from .monitor import Monitor
from .run_control import StepEnd
from .stop import RunStopped

Features = Dict[str, np.ndarray]
Stats = Tuple[np.ndarray, np.ndarray]
IMAGE_METRICS: Dict[str, Callable[[Features, np.ndarray, Dict[str, Stats]], float]] = {
    "digits_fd": lambda feats, labels, refs: frechet_distance(*feature_stats(feats["digits_feat"]), *refs["digits_fd"]),
    "digits_acc": lambda feats, labels, refs: float((feats["digits_pred"] == labels).mean()),
    "fid": lambda feats, labels, refs: frechet_distance(*feature_stats(feats["inception"]), *refs["fid"]),
    "mnist_fd": lambda feats, labels, refs: frechet_distance(*feature_stats(feats["mnist_feat"]), *refs["mnist_fd"]),
    "mnist_acc": lambda feats, labels, refs: float((feats["mnist_pred"] == labels).mean()),
}
"""How the run measures each registry metric of generated images (trainer.evaluation.registry's
metrics with an image-set function): from the features of the images, dealt over the ranks
(featurizers set up by the Evaluator), their labels and the reference statistics."""

JUDGES: Dict[str, Tuple[Judge, str]] = {"digits": (DIGITS, "the bundled digits"),
                                        "mnist": (MNIST, "the bundled MNIST digits")}
"""The eval.metrics groups judged by a held-out classifier: its judge, and the data it applies to."""


def first_samples(urls: List[str], manifest: Manifest, count: int,
                  batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first `count` samples of the shards in a fixed order (no shuffling, no flips, the
    posterior mean): latents [N, C, H, W] as trained (scaled) and labels [N]."""
    opts = LoaderOptions(batch_size=batch_size, num_workers=0, resampled=False, shuffle_buffer=0, hflip=False,
                         sample_posterior=False)
    xs, ys, got = [], [], 0
    for batch in LatentLoader(urls, manifest, 0, 1, opts):
        xs.append(batch.latents)
        ys.append(batch.labels)
        got += len(batch)
        if got >= count:
            break
    if not xs:
        raise RunStopped(f"no readable samples in {urls[0]} ... ({len(urls)} shards)")
    return torch.cat(xs)[:count], torch.cat(ys)[:count]


class Evaluator:
    """The run's evaluations: `due` says when, `run` measures (every rank) and reports (rank 0)."""

    def __init__(self, cfg: TrainConfig, dist_info: DistInfo, ema: EMA, *, manifest: Manifest, manifest_dir: str,
                 train_urls: List[str], val: Tuple[List[str], Manifest] | None, monitor: Monitor, resumed_step: int):
        self.cfg, self.dist, self.ema, self.manifest, self.monitor = cfg, dist_info, ema, manifest, monitor
        self.image_metrics: List[MetricSpec] = [s for s in in_groups(cfg.eval.metrics) if s.function is not None]
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
        for group in JUDGES:
            if group in e.metrics:
                self._set_up_judge(group)
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

    def _set_up_judge(self, group: str) -> None:
        """The featurizers of a held-out judge (digits, mnist) and its FD reference: the real train
        split at the dataset's resolution. The data must be the judge's own."""
        judge, data = JUDGES[group]
        spec = self.manifest.source.get("spec")
        if not str(spec or "").startswith(judge.name):
            raise RunStopped(f"eval.metrics has {group}, but the data are {spec!r}, not {data}")
        net = judge.load()
        self.featurizers[f"{group}_feat"] = lambda images: judge.features(images, net)
        self.featurizers[f"{group}_pred"] = lambda images: judge.predict(images, net)
        real, _ = judge.real("train", self.manifest.resolution or self.latent_shape[-1])
        self.references[f"{group}_fd"] = feature_stats(judge.features(real, net))

    # ------------------------------------------------------------------------- when and what

    def rewind(self, step: int) -> None:
        """The run went back to `step` (a rollback): its records of later steps go, as on resume."""
        if self.enabled and self.dist.rank == 0:
            keep_records_through(self.path, step)

    def due(self, end: StepEnd) -> bool:
        """Whether to evaluate after the step just finished: every eval.every steps, at the end of
        an unmask-tuning phase and at the end of the run."""
        return self.enabled and (end.step % self.cfg.eval.every == 0 or end.phase.phase_end or end.last)

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
            per_level = validation_loss(denoiser, self.val[0], self.val[1], sigmas=e.val_sigmas,
                                        batch_size=e.batch_size, seed=e.seed, rank=rank, world_size=world,
                                        device=device)
            metrics["val_loss"] = float(per_level.mean())
            metrics.update({f"val_loss/sigma={s:g}": float(v) for s, v in zip(e.val_sigmas, per_level)})
        for scale in e.guidance_scales if self.featurizers else []:
            settings = SampleSettings(sampler=e.sampler, steps=e.steps, guidance_scale=scale,
                                      skip_cache_interval=e.skip_cache, batch_size=e.batch_size, seed=e.seed,
                                      guidance=e.guidance)
            features, labels = generate_features(denoiser, settings, count=e.num_images,
                                                 latent_shape=self.latent_shape, num_classes=self.manifest.num_classes,
                                                 to_images=self.to_images, featurizers=self.featurizers, rank=rank,
                                                 world_size=world, device=device)
            for spec in self.image_metrics:
                metrics[guided(spec.name, scale)] = IMAGE_METRICS[spec.name](features, labels, self.references)
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
        shown = " | ".join(f"{k} {line_text(k, v)}" for k, v in metrics.items() if "/" not in k)
        say(f"eval step {state.step}: {shown} ({seconds:.1f}s, evaluation {share:.0%} of the wall time)")

    # ------------------------------------------------------------------------- inputs

    def _decoder(self) -> nn.Module | None:
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
        feats = reference_features(latents, batch_size=e.batch_size, to_images=self.to_images,
                                   featurize=lambda images: self._inception(inception, images), rank=self.dist.rank,
                                   world_size=self.dist.world_size, device=self.dist.device)
        mu, sigma = feature_stats(feats)
        if self.dist.rank == 0:
            try:
                tmp = f"{path}.tmp{os.getpid()}.npz"
                np.savez(tmp, mu=mu, sigma=sigma, count=len(feats))
                os.replace(tmp, path)
            except OSError as err:
                warn(f"cannot cache the FID reference statistics at {path} ({err}); they are recomputed at every "
                     "start")
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


def reference_stats_path(manifest_dir: str, manifest: Manifest, count: int, weights: str | None) -> str:
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
        return Evaluator(cfg, dist_info, ema, manifest=loader.manifest, manifest_dir="", train_urls=[], val=None,
                         monitor=monitor, resumed_step=resumed_step)
    urls, manifest = resolve_shards(d.shards, d.manifest)
    holdout = 0.0 if d.val_shards else d.val_fraction
    train_urls = split_holdout(urls, holdout, "train") if holdout else urls
    val = None
    if d.val_shards:
        val = resolve_shards(d.val_shards)
    elif holdout:
        val = (split_holdout(urls, holdout, "holdout"), manifest)
    where = os.path.dirname(os.path.abspath(manifest_location(d.shards, d.manifest)))
    return Evaluator(cfg, dist_info, ema, manifest=manifest, manifest_dir=where, train_urls=train_urls, val=val,
                     monitor=monitor, resumed_step=resumed_step)
