"""`mdt-sample`: class-conditional images from a checkpoint or an exported weights file.

    mdt-sample runs/digits_demo/checkpoints --classes all --per-class 10 --guidance-scale 2 --out samples/
    deepspeed --num_gpus 8 --module trainer.generate runs/NAME/checkpoints --num-images 50000 --out samples/

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

import argparse
import json
import math
import os
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

SAMPLER_STEPS = {"heun": 18, "euler": 50, "ddim": 50, "ddpm": 250}
NPZ_NAME = "samples.npz"


class SampleError(Exception):
    """A user-facing problem (missing checkpoint, unknown class, ...); the message is one line."""


# ----------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A network ready to sample, with what decoding needs to know about its data."""

    denoiser: Any
    model_name: str
    model_kwargs: Dict[str, Any]
    dataset: Dict[str, Any]
    step: int
    weights: str
    source: str

    @property
    def skip(self) -> bool:
        """Whether the network has Skip-DiT long skips (needed for Skip-Cache)."""
        return bool(self.model_kwargs.get("skip", False))


def resolve_checkpoint(path: str) -> str:
    """A complete checkpoint directory (or an exported .safetensors) from a tag dir, a checkpoints
    root (newest complete tag), a run dir, or a file."""
    from .checkpoint import COMPLETE, EMA_FILE, find_resume

    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise SampleError(f"checkpoint {path}: expected a checkpoint directory or an exported .safetensors file")
        return path
    if not os.path.isdir(path):
        raise SampleError(f"checkpoint {path} does not exist")
    if os.path.exists(os.path.join(path, COMPLETE)):
        return path
    if os.path.exists(os.path.join(path, EMA_FILE)):
        raise SampleError(f"checkpoint {path} is incomplete (no {COMPLETE} file): its save did not finish")
    root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    found = find_resume(root, "auto")
    if found is None:
        raise SampleError(f"checkpoint {path}: no complete checkpoint found under {root}")
    return found


def _denoiser(net, diffusion: Dict[str, Any]):
    from .config import ConfigError, config_from_dict
    from .task import build_denoiser

    try:
        cfg = config_from_dict({"diffusion": diffusion})
    except ConfigError as err:
        raise SampleError(f"diffusion settings of the checkpoint: {err}") from None
    return build_denoiser(net.eval().requires_grad_(False), cfg)


def load_model(path: str, weights: Optional[str] = None, device: torch.device | str = "cpu") -> LoadedModel:
    """Network + preconditioning from a checkpoint (EMA weights unless weights='model') or an
    exported safetensors file (whichever weights it holds)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from model_zoo.registry import build_model

    from .checkpoint import checkpoint_weights

    resolved = resolve_checkpoint(path)
    if os.path.isfile(resolved):
        with safe_open(resolved, framework="pt") as f:
            meta = f.metadata() or {}
        if "model" not in meta or "model_kwargs" not in meta:
            raise SampleError(f"{resolved} is not an mdt-export file (no model metadata)")
        held = meta.get("weights", "ema")
        if weights not in (None, held):
            raise SampleError(f"{resolved} holds {held} weights only (asked for --weights {weights})")
        name, kwargs = meta["model"], json.loads(meta["model_kwargs"])
        diffusion, dataset = json.loads(meta.get("diffusion", "{}")), json.loads(meta.get("dataset", "{}"))
        step, which, state_dict = int(meta.get("step", 0)), held, load_file(resolved)
    else:
        which = weights or "ema"
        if which not in ("ema", "model"):
            raise SampleError(f"--weights must be ema or model, got {which!r}")
        state_dict, state = checkpoint_weights(resolved, which)
        name, kwargs = state["model_name"], state["model_kwargs"]
        diffusion, dataset = state["config"].get("diffusion", {}), state.get("dataset") or {}
        step = int(state["step"])
    if not dataset.get("latent_shape"):
        raise SampleError(f"{resolved} carries no dataset summary (latent shape, encoder): re-save or re-export "
                          f"it with this version of the trainer")
    try:
        net = build_model(name, **kwargs)
        net.load_state_dict(state_dict)
    except (ValueError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SampleError(f"cannot rebuild {name} from {resolved}: {first}") from None
    return LoadedModel(_denoiser(net, diffusion).to(device), name, kwargs, dataset, step, which, resolved)


# ----------------------------------------------------------------------------- what to sample


def parse_classes(spec: str, num_classes: int, class_names: Optional[Sequence[str]] = None) -> List[int]:
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


def make_labels(classes: Sequence[int], per_class: Optional[int] = None, num: Optional[int] = None) -> np.ndarray:
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


def _pair(text: Optional[str], option: str) -> Optional[Tuple[float, float]]:
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise SampleError(f"{option} must be LO,HI (two numbers), got {text!r}") from None
    return lo, hi


# ----------------------------------------------------------------------------- sampling


@dataclass
class SampleSettings:
    """How to sample. skip_cache_interval None: no Skip-Cache."""

    sampler: str = "heun"
    steps: Optional[int] = None
    guidance_scale: float = 1.0
    guidance_interval: Optional[Tuple[float, float]] = None
    skip_cache_interval: Optional[int] = None
    skip_cache_keep: int = 1
    skip_cache_full_sigma: Optional[Tuple[float, float]] = None
    batch_size: int = 64
    seed: int = 0

    def resolved_steps(self) -> int:
        """--steps, or the sampler's usual count."""
        return self.steps if self.steps is not None else SAMPLER_STEPS[self.sampler]


@dataclass
class GenerateResult:
    """What a run wrote (paths on rank 0; None elsewhere) and what it executed."""

    out_dir: str
    npz: Optional[str]
    grid: Optional[str]
    num_images: int
    full_steps: int = 0
    cached_steps: int = 0
    steps_per_batch: Tuple[int, int] = (0, 0)
    seconds: float = 0.0
    labels: Optional[np.ndarray] = field(default=None, repr=False)


def check_settings(model: LoadedModel, s: SampleSettings):
    """Validate sampler / guidance / Skip-Cache against the model; returns (sigmas, SkipCacheConfig)."""
    from .sampling import SAMPLERS, SkipCacheConfig, default_sigmas

    if s.sampler not in SAMPLERS:
        raise SampleError(f"unknown sampler {s.sampler!r}: choose from {', '.join(SAMPLERS)}")
    if s.batch_size < 1:
        raise SampleError(f"--batch-size must be >= 1, got {s.batch_size}")
    if not math.isfinite(s.guidance_scale):
        raise SampleError(f"--guidance-scale must be a finite number, got {s.guidance_scale}")
    if s.guidance_interval is not None and not 0 <= s.guidance_interval[0] < s.guidance_interval[1]:
        raise SampleError(f"--guidance-interval must be LO,HI with 0 <= LO < HI, got {s.guidance_interval}")
    try:
        sigmas = default_sigmas(s.sampler, s.resolved_steps(), getattr(model.denoiser.precond, "schedule", None))
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


def load_decoder(model: LoadedModel, vae: Optional[str], device: torch.device):
    """The VAE for latents (the dataset's encoder id, or `vae`), None for pixel data."""
    encoder = model.dataset.get("encoder") or {}
    kind = encoder.get("kind")
    if kind == "pixels":
        return None
    if kind != "vae":
        raise SampleError(f"{model.source}: unknown encoder kind {kind!r} in the dataset summary")
    from data_tools.format import DataToolsError
    from data_tools.vae import load_autoencoder

    try:
        return load_autoencoder(vae or encoder.get("id", ""), torch.float32).eval().requires_grad_(False).to(device)
    except DataToolsError as err:
        raise SampleError(str(err)) from None


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3]."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class _Progress:
    """One progress line on rank 0: rewritten in place on a terminal, else about every 10%."""

    def __init__(self, total: int, world: int, enabled: bool):
        self.total, self.world, self.enabled = total, world, enabled
        self.tty = sys.stderr.isatty()
        self.start = time.time()
        self.next_report = 0.0

    def update(self, done: int, batches: int, batch_total: int) -> None:
        if not self.enabled:
            return
        frac = done / max(self.total, 1)
        if not self.tty and frac < self.next_report and done < self.total:
            return
        self.next_report = frac + 0.1
        rate = done * self.world / max(time.time() - self.start, 1e-9)
        line = (f"sampling: batch {batches}/{batch_total} | {done}/{self.total} images on rank 0 "
                f"({self.world} rank{'s' if self.world > 1 else ''}) | {rate:.1f} img/s")
        print(f"\r{line}" if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)
        if self.tty and done >= self.total:
            print(file=sys.stderr)


def generate(model: LoadedModel, labels: np.ndarray, out_dir: str, settings: SampleSettings,
             vae: Optional[str] = None, rank: int = 0, world_size: int = 1,
             device: Optional[torch.device] = None, png: bool = True, grid_count: int = 100,
             grid_cols: Optional[int] = None, progress: bool = True, decoder=None) -> GenerateResult:
    """Sample images for `labels` (this rank's share), write PNGs and this rank's part; rank 0
    then merges every rank's part into samples.npz and draws the grid (after a barrier)."""
    from .distributed import barrier
    from .preview import decode_latents, make_grid, save_png
    from .sampling import sample

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
    bar = _Progress(len(mine), world_size, progress and rank == 0)
    result = GenerateResult(out_dir, None, None, len(labels))
    start = time.time()
    for b in range(batches):
        idx = mine[b * bs:(b + 1) * bs]
        noise = torch.stack([image_noise(settings.seed, int(i), shape) for i in idx]).to(device)
        y = torch.from_numpy(labels[idx]).to(device)
        gens = [step_generator(settings.seed, int(i), device) for i in idx] if settings.sampler == "ddpm" else None
        out = sample(model.denoiser, noise, y, sigmas.to(device), settings.sampler, settings.guidance_scale,
                     settings.guidance_interval, skip, generator=gens)
        with torch.no_grad():
            images = _to_uint8(decode_latents(out.x, scaling, encoder, decoder))
        if part_images is None:
            part_images = np.lib.format.open_memmap(os.path.join(parts, f"rank{rank}.npy"), mode="w+",
                                                    dtype=np.uint8, shape=(len(mine), *images.shape[1:]))
        part_images[b * bs:b * bs + len(idx)] = images
        if png:
            from PIL import Image

            for i, im in zip(idx, images):
                Image.fromarray(im).save(os.path.join(out_dir, "images", f"{int(i):06d}.png"))
        result.full_steps += out.full_steps
        result.cached_steps += out.cached_steps
        if b == 0:
            result.steps_per_batch = (out.full_steps, out.cached_steps)
        bar.update(b * bs + len(idx), b + 1, batches)
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


def sample_checkpoint(checkpoint: str, out_dir: str, classes: str | Sequence[int] = "all",
                      per_class: Optional[int] = None, num: Optional[int] = None, weights: Optional[str] = None,
                      vae: Optional[str] = None, png: bool = True, progress: bool = False,
                      device: Optional[torch.device] = None, **settings: Any) -> GenerateResult:
    """One-process sampling as a function (the demo's call): e.g.
    sample_checkpoint("runs/digits_demo/checkpoints", "runs/digits_demo/eval", per_class=10,
    guidance_scale=2.0, steps=18). settings: fields of SampleSettings. Raises SampleError."""
    device = device or _device(0)
    model = load_model(checkpoint, weights, device)
    names = model.dataset.get("class_names")
    num_classes = int(model.dataset.get("num_classes") or model.model_kwargs.get("num_classes"))
    chosen = parse_classes(classes, num_classes, names) if isinstance(classes, str) else \
        parse_classes(",".join(str(c) for c in classes), num_classes, names)
    labels = make_labels(chosen, per_class, num)
    return generate(model, labels, out_dir, SampleSettings(**settings), vae=vae, device=device, png=png,
                    progress=progress, grid_cols=_grid_cols(per_class, len(chosen)))


def _grid_cols(per_class: Optional[int], num_classes: int) -> Optional[int]:
    """Grid columns: one row per class (--per-class), or one column per class (cycling labels);
    a square grid when that would be wider than 20."""
    cols = per_class if per_class is not None else num_classes
    return cols if cols <= 20 else None


def _device(local_rank: int) -> torch.device:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return torch.device("cpu") if acc.device_name() == "cpu" else torch.device(acc.device_name(local_rank))


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    from .cli import OneLineParser

    p = OneLineParser(prog="mdt-sample", description="Generate class-conditional images from a checkpoint or an "
                                                "exported weights file; write PNGs, a grid and an ADM-layout .npz.")
    p.add_argument("checkpoint", help="checkpoint tag dir, checkpoints root or run dir (newest complete "
                                      "checkpoint), or an mdt-export .safetensors file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--weights", default=None, help="ema (default) or model (live weights of a checkpoint)")
    p.add_argument("--classes", default="all", help="'all' or comma-separated class indices / names")
    count = p.add_mutually_exclusive_group()
    count.add_argument("--per-class", type=int, default=None, help="images per class (grouped by class)")
    count.add_argument("--num-images", "--num", dest="num", type=int, default=None,
                       help="total images, cycling through the classes (spell it --num-images under the deepspeed "
                            "launcher, whose own parser takes --num for an abbreviation)")
    p.add_argument("--sampler", default="heun", help="heun (default), euler, ddim or ddpm")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: " + ", ".join(f"{k} {v}" for k, v in SAMPLER_STEPS.items()) + ")")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    p.add_argument("--guidance-interval", default=None, metavar="LO,HI", help="guide only where LO < sigma <= HI")
    p.add_argument("--skip-cache", type=int, default=None, metavar="N",
                   help="Skip-Cache: one full step then N-1 cached steps (skip models only)")
    p.add_argument("--skip-keep", type=int, default=1, help="Skip-Cache: blocks run at each end on cached steps")
    p.add_argument("--skip-full-sigma", default=None, metavar="LO,HI",
                   help="Skip-Cache: always run the full model where LO <= sigma <= HI")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch on each rank")
    p.add_argument("--seed", type=int, default=0, help="image i's noise comes from (seed, i)")
    p.add_argument("--vae", default=None, help="VAE directory or hub id (default: the dataset's encoder id)")
    p.add_argument("--no-png", action="store_true", help="write only the .npz and the grid")
    p.add_argument("--grid", type=int, default=100, help="images in grid.png (default 100)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # from the deepspeed launcher
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """mdt-sample: validate everything (checkpoint, classes, sampler, Skip-Cache, VAE) before any
    process group starts; errors are one line and exit 2."""
    args = _parser().parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(local_rank)
    try:
        if args.per_class is None and args.num is None:
            raise SampleError("give --per-class K or --num-images N")
        settings = SampleSettings(args.sampler, args.steps, args.guidance_scale,
                                  _pair(args.guidance_interval, "--guidance-interval"), args.skip_cache,
                                  args.skip_keep, _pair(args.skip_full_sigma, "--skip-full-sigma"),
                                  args.batch_size, args.seed)
        if args.skip_cache is not None and args.skip_cache < 1:
            raise SampleError(f"--skip-cache must be >= 1, got {args.skip_cache}")
        model = load_model(args.checkpoint, args.weights, device)
        num_classes = int(model.dataset.get("num_classes") or model.model_kwargs["num_classes"])
        classes = parse_classes(args.classes, num_classes, model.dataset.get("class_names"))
        labels = make_labels(classes, args.per_class, args.num)
        check_settings(model, settings)
        decoder = load_decoder(model, args.vae, device)
    except SampleError as err:
        if rank == 0:
            print(f"mdt-sample: error: {err}", file=sys.stderr)
        return 2
    if world > 1:
        from .distributed import init_distributed

        init_distributed()
    try:
        if rank == 0:
            print(f"sampling {len(labels)} images of {len(classes)} class(es) from {model.source} "
                  f"({model.model_name}, step {model.step}, {model.weights} weights) on {world} rank(s): "
                  f"{settings.sampler}, {settings.resolved_steps()} steps, guidance {settings.guidance_scale:g}",
                  flush=True)
        result = generate(model, labels, args.out, settings, args.vae, rank, world, device, not args.no_png,
                          args.grid, _grid_cols(args.per_class, len(classes)), not args.quiet, decoder=decoder)
        if rank == 0:
            full, cached = result.steps_per_batch
            print(f"model evaluations per batch: {full} full + {cached} cached"
                  + (f" (Skip-Cache interval {settings.skip_cache_interval or 2}, keep {settings.skip_cache_keep})"
                     if cached or settings.skip_cache_interval else ""), flush=True)
            print(f"rank 0: {result.full_steps} full + {result.cached_steps} cached steps in "
                  f"{result.seconds:.1f}s", flush=True)
            print(f"wrote {result.npz} (arr_0 uint8 {len(labels)} images, arr_1 labels)", flush=True)
            print(f"grid: {result.grid}", flush=True)
    finally:
        if world > 1:
            from .distributed import shutdown

            shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
