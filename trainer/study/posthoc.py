"""A study's post-hoc judgement of each finished run: images from the final checkpoint's EMA weights
at each of the study's guidance scales, judged by the digits classifier (digits FD and accuracy),
and the same with Skip-Cache on models with skip branches (sampling wall time with and without
it). Results are cached in RUN_DIR/posthoc.json, one entry per scale, so a rerun of the study
only does what is missing; a new checkpoint or other settings start the file over."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Dict, Tuple

import numpy as np
import torch

from data_tools.atomic import write_json_atomic
from model_zoo.registry import MODELS

from ..checkpoints import find_resume, read_record
from ..config import ConfigError
from ..evaluation.digits import digits_accuracy, digits_fd
from ..evaluation.mnist import mnist_accuracy, mnist_fd
from ..sample.generate import SampleSettings, generate, make_labels
from ..sample.loading import LoadedModel, SampleError, load_model
from .budget import dataset_manifest
from .spec import PlannedRun, Study, StudyError

POSTHOC_FILE = "posthoc.json"
SEED = 0
"""Noise seed of every post-hoc judgement: each run and scale starts from the same noise."""


JUDGES: Dict[str, Tuple[Callable[[np.ndarray], float], Callable[[np.ndarray, np.ndarray], float]]] = {
    "digits": (digits_fd, digits_accuracy),
    "mnist": (mnist_fd, mnist_accuracy),
}
"""The data sets with a held-out judge: name -> (Frechet distance, class accuracy); the post-hoc
metrics are NAME_fd and NAME_acc."""

GUIDANCE_TABLES = {"cfg": "guidance", "path_drop": "path_drop"}
"""posthoc.json's table of each guidance kind (Skip-Cache's is under skip_cache, with cfg)."""


def _judge_of(run: PlannedRun) -> Tuple[str | None, str | None]:
    """(the judge of the run's data set, None) or (None, why there is no post-hoc judgement)."""
    try:
        spec = str(dataset_manifest(run.config).source.get("spec", ""))
    except ConfigError as err:
        return None, f"no post-hoc judgement: {err}"
    name = spec.partition(":")[0]
    if name not in JUDGES:
        return None, f"no post-hoc judgement: the data are {spec!r}, and only {', '.join(JUDGES)} have a judge here"
    return name, None


def _judge(model: LoadedModel, labels: np.ndarray, out_dir: str, settings: SampleSettings,
           device: torch.device, judge: str) -> Dict[str, float]:
    """Sample, then judge: the data set's FD and accuracy, the sampling wall time (seconds) and the
    network GFLOPs one image cost (counted)."""
    result = generate(model, labels, out_dir, settings, device=device, png=False, progress=False)
    with np.load(result.npz) as npz:
        images = npz["arr_0"]
    fd, accuracy = JUDGES[judge]
    return {f"{judge}_fd": fd(images), f"{judge}_acc": accuracy(images, labels), "seconds": result.seconds,
            "gflops_per_image": result.gflops_per_image}


def _warm_up(model: LoadedModel, labels: np.ndarray, out_dir: str, device: torch.device) -> None:
    """A few images first, so that one-time costs do not land on the first timed judgement."""
    generate(model, labels[:8], out_dir, SampleSettings(seed=SEED), device=device, png=False, progress=False)
    shutil.rmtree(out_dir, ignore_errors=True)


def posthoc(run: PlannedRun, study: Study, device: torch.device | str,
            log: Callable[[str], None] = print) -> Dict[str, Any] | None:
    """The post-hoc judgement of a finished run, as cached in posthoc.json: {settings, note, guidance:
    {scale: {NAME_fd, NAME_acc, seconds, gflops_per_image}}, skip_cache: {interval, guidance: {...}},
    path_drop: {scale: {...}} (path-drop guidance, SPRINT runs)}, NAME the data set's judge. Only
    what the file lacks is sampled. None when the study asks for none (posthoc_images 0)."""
    if study.posthoc_images == 0:
        return None
    checkpoint = find_resume(os.path.join(run.run_dir, "checkpoints"), "auto")
    if checkpoint is None:
        raise StudyError(f"run {run.name}: no complete checkpoint in {run.run_dir} to judge")
    record = read_record(checkpoint)
    settings = {"checkpoint": os.path.basename(checkpoint), "step": record.step, "images": study.posthoc_images,
                "sampler": SampleSettings.sampler, "steps": SampleSettings().resolved_steps(), "seed": SEED}
    path = os.path.join(run.run_dir, POSTHOC_FILE)
    result: Dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            result = json.load(f)
    if result.get("settings") != settings:
        result = {"settings": settings, "guidance": {}}
    judge, no_judge = _judge_of(run)
    result["note"] = no_judge
    intervals = [None]
    if study.skip_cache and judge:
        if record.model_kwargs.get("skip"):
            if (result.get("skip_cache") or {}).get("interval") != study.skip_cache:
                result["skip_cache"] = {"interval": study.skip_cache, "guidance": {}}
            intervals.append(study.skip_cache)
        else:
            result["note"] = f"no Skip-Cache for {run.name}: its {record.model_name} has no skip branches"
    sprint = getattr(MODELS.get(record.model_name), "family", "") == "sprint"
    kinds = ["cfg"] + (["path_drop"] if "path_drop" in study.guidance_kinds and sprint else [])
    for kind in kinds[1:]:
        result.setdefault(GUIDANCE_TABLES[kind], {})
    # Each scale with and without Skip-Cache, and with each guidance, back to back: timed under the same load.
    jobs = [] if not judge else [(interval, "cfg", g) for g in study.guidance for interval in intervals] + \
        [(None, kind, g) for g in study.guidance for kind in kinds[1:] if g != 1]
    model, labels = None, None
    for interval, kind, scale in jobs:
        table = result["skip_cache"]["guidance"] if interval else result[GUIDANCE_TABLES[kind]]
        if f"{scale:g}" in table:
            continue
        out = os.path.join(run.run_dir, "posthoc", f"g{scale:g}" + (f"-skip{interval}" if interval else "")
                           + ("-pdg" if kind == "path_drop" else ""))
        if model is None:
            try:
                model = load_model(checkpoint, "ema", device)
            except SampleError as err:
                raise StudyError(f"run {run.name}: {err}") from None
            classes = int(model.dataset.get("num_classes") or model.model_kwargs["num_classes"])
            labels = make_labels(list(range(classes)), num=study.posthoc_images)
            _warm_up(model, labels, out + "-warmup", device)
        log(f"post-hoc {run.name}: {study.posthoc_images} images at guidance {scale:g}"
            + (f" with Skip-Cache interval {interval}" if interval else "")
            + (" (path-drop guidance)" if kind == "path_drop" else ""))
        sampling = SampleSettings(guidance_scale=scale, skip_cache_interval=interval, seed=SEED, guidance=kind)
        table[f"{scale:g}"] = _judge(model, labels, out, sampling, device, judge)
        write_json_atomic(path, result)  # after every judgement: an interrupted study keeps what it did
    write_json_atomic(path, result)
    return result
