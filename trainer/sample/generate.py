"""`mdt-sample`: class-conditional images from a checkpoint or an exported weights file.

    mdt-sample runs/digits_demo/checkpoints --classes all --per-class 10 --guidance-scale 2 --out samples/
    deepspeed --num_gpus 8 --module trainer.sample runs/NAME/checkpoints --num-images 50000 --out samples/

Image i has label classes[i // per_class] (--per-class) or classes[i % len(classes)] (--num-images) and
its starting noise from (seed, i) alone, and the ddpm sampler's per-step noise from a generator of its
own seeded from (seed, i), so the images do not depend on the batch size or on the number of
ranks; under a launcher (RANK / WORLD_SIZE set) rank r makes images r, r + W, r + 2W, ... and rank 0
merges them.

Written under --out: images/NNNNNN.png (one per image), grid.png (the first --grid images), and
samples.npz with `arr_0` uint8 [N, H, W, 3] and `arr_1` int64 labels [N] -- the layout of
guided-diffusion's samplers, read by its ADM evaluation suite (evaluations/evaluator.py) and by
`mdt-eval`.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from typing import Any, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..diffusion import GUIDANCE_KINDS, SAMPLERS, SkipCacheConfig, default_sigmas, sample
from ..distributed import accelerator_device, barrier
from ..progress import ProgressLine
from .cost import step_costs
from .loading import LoadedModel, SampleError, load_decoder, load_model
from .preview import decode_latents, make_grid, save_png

NPZ_NAME = "samples.npz"


# ----------------------------------------------------------------------------- what to sample


def parse_classes(spec: str, num_classes: int, class_names: Sequence[str] | None = None) -> List[int]:
    """'all' or comma-separated class indices / names -> label list (names win only when not numbers)."""
    if spec.strip() == "all":
        return list(range(num_classes))
    names = list(class_names or [])
    out = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if token.lstrip("-").isdigit():
            value = int(token)
        elif token in names:
            value = names.index(token)
        else:
            raise SampleError(f"unknown class {token!r} in --classes: use indices 0..{num_classes - 1}"
                              + (f" or names such as {', '.join(names[:5])}" if names else "") + " or 'all'")
        if not 0 <= value < num_classes:
            raise SampleError(f"unknown class '{value}' in --classes: the model has classes 0..{num_classes - 1}")
        out.append(value)
    if not out:
        raise SampleError("--classes is empty")
    return out


def make_labels(classes: Sequence[int], per_class: int | None = None, num: int | None = None) -> np.ndarray:
    """Labels of all images: grouped by class (per_class) or cycling through the classes (num)."""
    if (per_class is None) == (num is None):
        raise SampleError("give exactly one of --per-class and --num-images")
    if per_class is not None:
        if per_class < 1:
            raise SampleError(f"--per-class must be >= 1, got {per_class}")
        return np.repeat(np.asarray(classes, np.int64), per_class)
    if num < 1:
        raise SampleError(f"--num-images must be >= 1, got {num}")
    return np.asarray(classes, np.int64)[np.arange(num) % len(classes)]


def _seed63(*entropy: int) -> int:
    """A non-negative 63-bit generator seed mixed from the integers `entropy` (numpy's SeedSequence)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def step_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of image `index`'s per-step sampler noise (ddpm), from (seed, index) only."""
    return torch.Generator(device=device).manual_seed(_seed63(seed, index, 1))


def image_noise(seed: int, index: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard-normal starting noise of image `index`, from (seed, index) only (drawn on CPU)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(_seed63(seed, index)))


def parse_pair(text: str | None, option: str) -> Tuple[float, float] | None:
    """"LO,HI" as two floats (None stays None); SampleError naming `option` otherwise."""
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise SampleError(f"{option} must be LO,HI (two numbers), got {text!r}") from None
    return lo, hi


# ----------------------------------------------------------------------------- sampling


@dataclass(kw_only=True)
class SampleSettings:
    """How to sample (fields by name). skip_cache_interval None: no Skip-Cache."""

    sampler: str = "heun"
    steps: int | None = None
    guidance_scale: float = 1.0
    guidance_interval: Tuple[float, float] | None = None
    skip_cache_interval: int | None = None
    skip_cache_keep: int = 1
    skip_cache_full_sigma: Tuple[float, float] | None = None
    batch_size: int = 64
    seed: int = 0
    guidance_channels: int | None = None
    guidance: str = "cfg"
    """The weak branch of guidance: 'cfg' (the null class) or 'path_drop' (the null class with a
    SPRINT network's sparse path dropped: path-drop guidance)."""

    def resolved_steps(self) -> int:
        """--steps, or the sampler's usual count."""
        return self.steps if self.steps is not None else SAMPLERS[self.sampler].default_steps


@dataclass
class GenerateResult:
    """What a run wrote (paths on rank 0; None elsewhere) and what it executed."""

    out_dir: str
    npz: str | None
    grid: str | None
    num_images: int
    full_steps: int = 0
    cached_steps: int = 0
    steps_per_batch: Tuple[int, int] = (0, 0)
    seconds: float = 0.0
    gflops_per_image: float = 0.0
    """Network GFLOPs one image cost (every evaluation of its sampling run, both guidance branches;
    counted, not timed: trainer.sample.cost)."""
    labels: np.ndarray | None = field(default=None, repr=False)


def check_settings(model: LoadedModel, s: SampleSettings) -> Tuple[torch.Tensor, SkipCacheConfig | None]:
    """Validate sampler / guidance / Skip-Cache against the model; returns (sigmas, SkipCacheConfig)."""
    if s.sampler not in SAMPLERS:
        raise SampleError(f"unknown sampler {s.sampler!r}: choose from {', '.join(SAMPLERS)}")
    if s.batch_size < 1:
        raise SampleError(f"--batch-size must be >= 1, got {s.batch_size}")
    if not math.isfinite(s.guidance_scale):
        raise SampleError(f"--guidance-scale must be a finite number, got {s.guidance_scale}")
    if s.guidance_interval is not None and not 0 <= s.guidance_interval[0] < s.guidance_interval[1]:
        raise SampleError(f"--guidance-interval must be LO,HI with 0 <= LO < HI, got {s.guidance_interval}")
    if s.guidance not in GUIDANCE_KINDS:
        raise SampleError(f"--guidance must be one of {', '.join(k.replace('_', '-') for k in GUIDANCE_KINDS)}, got "
                          f"{s.guidance.replace('_', '-')!r}")
    if s.guidance == "path_drop" and getattr(model.denoiser.net, "family", "") != "sprint":
        raise SampleError(f"--guidance path-drop needs a network with a droppable sparse path (SPRINT); "
                          f"{model.source} is {model.model_name}")
    channels = model.denoiser.net.in_channels
    if s.guidance_channels is not None and not 1 <= s.guidance_channels <= channels:
        raise SampleError(f"--guidance-channels must be in 1..{channels} (the model's latent channels), got "
                          f"{s.guidance_channels}")
    try:
        sigmas = default_sigmas(s.sampler, s.resolved_steps(), getattr(model.denoiser.precond, "schedule", None),
                                model.denoiser.precond.name)
    except ValueError as err:
        raise SampleError(f"--steps: {err}") from None
    skip = None
    if s.skip_cache_interval is not None or s.skip_cache_full_sigma is not None or s.skip_cache_keep != 1:
        if not model.skip:
            raise SampleError(f"Skip-Cache needs a model trained with skip branches (model.skip: true); "
                              f"{model.source} ({model.model_name}) has none")
        try:
            skip = SkipCacheConfig(s.skip_cache_interval or 2, s.skip_cache_keep, s.skip_cache_full_sigma)
            model.denoiser.new_skip_cache(skip.n_keep)  # checks n_keep against the depth
        except ValueError as err:
            raise SampleError(f"Skip-Cache: {err}") from None
    return sigmas, skip


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3]."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def generate(model: LoadedModel, labels: np.ndarray, out_dir: str, settings: SampleSettings, *,
             vae: str | None = None, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
             png: bool = True, grid_count: int = 100, grid_cols: int | None = None, progress: bool = True,
             decoder: nn.Module | None = None) -> GenerateResult:
    """Sample images for `labels` (this rank's share), write PNGs and this rank's part; rank 0
    then merges every rank's part into samples.npz and draws the grid (after a barrier)."""
    device = device or torch.device("cpu")
    sigmas, skip = check_settings(model, settings)
    if decoder is None:
        decoder = load_decoder(model, vae, device)
    shape = tuple(model.dataset["latent_shape"])
    scaling = float(model.dataset.get("scaling_factor", 1.0))
    encoder = model.dataset.get("encoder") or {}
    mine = np.arange(rank, len(labels), world_size)
    parts = os.path.join(out_dir, "parts")
    os.makedirs(parts, exist_ok=True)
    if png:
        os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    part_images = None
    bs = settings.batch_size
    batches = math.ceil(len(mine) / bs)
    bar = ProgressLine(len(mine), "img", progress and rank == 0, rate_scale=world_size)
    ranks = f"{world_size} rank{'s' if world_size > 1 else ''}"
    result = GenerateResult(out_dir, None, None, len(labels))
    start = time.time()
    for b in range(batches):
        idx = mine[b * bs:(b + 1) * bs]
        noise = torch.stack([image_noise(settings.seed, int(i), shape) for i in idx]).to(device)
        y = torch.from_numpy(labels[idx]).to(device)
        stochastic = SAMPLERS[settings.sampler].stochastic  # its step noise per image: batch-independent
        gens = [step_generator(settings.seed, int(i), device) for i in idx] if stochastic else None
        out = sample(model.denoiser, noise, y, sigmas.to(device), sampler=settings.sampler,
                     guidance_scale=settings.guidance_scale, guidance_interval=settings.guidance_interval,
                     skip_cache=skip, generator=gens, guidance_channels=settings.guidance_channels,
                     guidance=settings.guidance)
        with torch.no_grad():
            images = _to_uint8(decode_latents(out.x, scaling, encoder, decoder))
        if part_images is None:
            part_images = np.lib.format.open_memmap(os.path.join(parts, f"rank{rank}.npy"), mode="w+",
                                                    dtype=np.uint8, shape=(len(mine), *images.shape[1:]))
        part_images[b * bs:b * bs + len(idx)] = images
        if png:
            for i, im in zip(idx, images):
                Image.fromarray(im).save(os.path.join(out_dir, "images", f"{int(i):06d}.png"))
        result.full_steps += out.full_steps
        result.cached_steps += out.cached_steps
        if b == 0:
            result.steps_per_batch = (out.full_steps, out.cached_steps)
            costs = step_costs(model.model_name, model.model_kwargs, settings.guidance,
                               skip.n_keep if skip is not None else None)
            result.gflops_per_image = costs.per_image(out.full_steps, out.cached_steps, out.weak_full_steps,
                                                      out.weak_cached_steps) / 1e9
        done = b * bs + len(idx)
        bar.update(done, f"sampling: batch {b + 1}/{batches} | {done}/{len(mine)} images on rank 0 ({ranks})")
    if part_images is not None:
        part_images.flush()
        del part_images
    result.seconds = time.time() - start
    barrier()
    if rank == 0:
        result.npz = merge_parts(out_dir, labels, world_size)
        first = torch.from_numpy(_first_images(out_dir, min(grid_count, len(labels)), world_size))
        first = first.permute(0, 3, 1, 2).float() / 255
        result.grid = save_png(make_grid(first, nrow=grid_cols), os.path.join(out_dir, "grid.png"))
        result.labels = labels
        shutil.rmtree(parts, ignore_errors=True)
    barrier()
    return result


def _first_images(out_dir: str, count: int, world_size: int) -> np.ndarray:
    """Images 0..count-1 read from the ranks' parts (image i is row i // W of rank i % W's part)."""
    parts = {}
    rows = []
    for i in range(count):
        r = i % world_size
        if r not in parts:
            parts[r] = np.load(os.path.join(out_dir, "parts", f"rank{r}.npy"), mmap_mode="r")
        rows.append(np.asarray(parts[r][i // world_size]))
    return np.stack(rows)


def merge_parts(out_dir: str, labels: np.ndarray, world_size: int) -> str:
    """Interleave the ranks' parts (rank r holds images r, r + W, ...) into one .npz, streamed so
    that no more than one chunk of images sits in memory. Returns its path."""
    parts = [np.load(os.path.join(out_dir, "parts", f"rank{r}.npy"), mmap_mode="r")
             for r in range(min(world_size, len(labels)))]
    n = len(labels)
    shape = (n, *parts[0].shape[1:])
    path = os.path.join(out_dir, NPZ_NAME)
    tmp = f"{path}.tmp"
    chunk = max(world_size, 1024 // world_size * world_size)
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                     "fortran_order": False, "shape": shape})
            for lo in range(0, n, chunk):
                hi = min(n, lo + chunk)
                block = np.empty((hi - lo, *shape[1:]), np.uint8)
                for r, part in enumerate(parts):
                    first = lo + (r - lo) % world_size  # first index >= lo owned by rank r
                    count = len(range(first, hi, world_size))
                    block[first - lo::world_size] = part[first // world_size:first // world_size + count]
                f.write(block.tobytes())
        with zf.open("arr_1.npy", "w") as f:
            np.lib.format.write_array(f, np.asarray(labels, np.int64))
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- Python entry point


def sample_checkpoint(checkpoint: str, out_dir: str, classes: str | Sequence[int] = "all", *,
                      per_class: int | None = None, num: int | None = None, weights: str | None = None,
                      vae: str | None = None, png: bool = True, progress: bool = False,
                      device: torch.device | None = None, **settings: Any) -> GenerateResult:
    """One-process sampling as a function (the demo's call): e.g.
    sample_checkpoint("runs/digits_demo/checkpoints", "runs/digits_demo/eval", per_class=10,
    guidance_scale=2.0, steps=18). settings: fields of SampleSettings. Raises SampleError."""
    device = device or accelerator_device()
    model = load_model(checkpoint, weights, device)
    names = model.dataset.get("class_names")
    num_classes = int(model.dataset.get("num_classes") or model.model_kwargs.get("num_classes"))
    chosen = parse_classes(classes, num_classes, names) if isinstance(classes, str) else \
        parse_classes(",".join(str(c) for c in classes), num_classes, names)
    labels = make_labels(chosen, per_class, num)
    return generate(model, labels, out_dir, SampleSettings(**settings), vae=vae, device=device, png=png,
                    progress=progress, grid_cols=grid_columns(per_class, len(chosen)))


def grid_columns(per_class: int | None, num_classes: int) -> int | None:
    """Grid columns: one row per class (--per-class), or one column per class (cycling labels);
    a square grid when that would be wider than 20."""
    cols = per_class if per_class is not None else num_classes
    return cols if cols <= 20 else None
