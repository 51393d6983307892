"""Typed launch configuration: dataclasses with a docstring per field, YAML + --set overrides,
validation that names the offending key, and the DeepSpeed JSON derived from it.

Everything here runs before any process group exists, so a bad config fails in a second with one
line instead of after a cluster allocation has started.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import yaml


class ConfigError(ValueError):
    """A user error in the launch config; the message is one line naming the key."""


@dataclass
class RunConfig:
    """Identity and length of a run."""

    name: str = "run"
    """Run name; the run directory is output_dir/name (checkpoints, TensorBoard logs, samples)."""
    output_dir: str = "runs"
    """Parent directory of run directories."""
    seed: int = 0
    """Base seed: per-step randomness is derived from (seed, rank, step), data from (seed, rank, worker, position)."""
    total_steps: int = 1000
    """Optimizer steps of the whole run, all phases included."""
    stall_timeout_s: float = 1800.0
    """A rank that makes no progress (no finished step, save or sample grid) for this long prints every
    thread's stack and exits with status 4, so a hung job ends instead of idling until the scheduler's
    limit; rerunning resumes from the last checkpoint. Covers start-up too. 0 disables."""

    stop_file: Optional[str] = None
    """While the run trains, creating this file makes it remove the file, finish the step, save a
    checkpoint and exit with status 5 (as SIGTERM / SIGUSR1 / Ctrl-C do); null: RUN_DIR/STOP."""

    def run_dir(self) -> str:
        """Directory holding everything this run writes."""
        return os.path.join(self.output_dir, self.name)

    def stop_path(self) -> str:
        """The stop file's path (see stop_file)."""
        return self.stop_file or os.path.join(self.run_dir(), "STOP")


@dataclass
class ModelConfig:
    """The network (see model_zoo.registry)."""

    name: str = "MaskDiT-S/2"
    """Registry name, e.g. MaskDiT-XL/2 or DiT-XL/2."""
    options: Dict[str, Any] = field(default_factory=dict)
    """Constructor overrides, e.g. {hidden_size: 64, depth: 4, decoder_depth: 2}."""
    skip: bool = False
    """Skip-DiT long skip branches (enables Skip-Cache sampling)."""
    class_dropout_prob: float = 0.1
    """Probability of training a sample as unconditional (classifier-free guidance)."""
    activation_checkpointing: str = "none"
    """Per-block recomputation: none, torch (non-reentrant), deepspeed, fairscale."""
    offload_activations: bool = False
    """With fairscale checkpointing: keep block inputs on the CPU."""
    compile: bool = False
    """torch.compile the network (after DeepSpeed wraps it)."""


@dataclass
class DiffusionConfig:
    """Noise levels, parameterisation and loss (see trainer.diffusion, trainer.objective)."""

    preconditioning: str = "edm"
    """edm, vp_eps, vp_v or vp_x0."""
    sigma_sampler: str = "lognormal"
    """lognormal (EDM), ddpm_linear or ddpm_cosine (uniform over t)."""
    p_mean: float = -1.2
    """Mean of ln(sigma) for the lognormal sampler."""
    p_std: float = 1.2
    """Std of ln(sigma) for the lognormal sampler."""
    sigma_data: float = 0.5
    """Data standard deviation assumed by EDM preconditioning and weighting."""
    weighting: str = "min_snr"
    """Loss weight: edm, constant, snr, min_snr, soft_min_snr."""
    gamma: float = 5.0
    """Min-SNR cap."""
    lambda_mae: float = 0.1
    """Weight of MaskDiT's MAE reconstruction of masked tokens."""


@dataclass
class DataConfig:
    """The latent stream (see trainer.data)."""

    shards: str = ""
    """Dataset directory, manifest.json, brace pattern, or pipe: URL."""
    manifest: Optional[str] = None
    """Manifest path when shards is a pattern whose directory has none."""
    batch_size: int = 256
    """Global batch: images per optimizer step over all ranks."""
    micro_batch_size: int = 32
    """Images per forward on one rank; accumulation = batch_size / (micro_batch_size x ranks)."""
    num_workers: int = 2
    """Loader worker processes per rank."""
    shuffle_buffer: int = 1000
    """Samples held per worker for shuffling."""
    hflip: bool = True
    """Use the stored flipped latents half of the time."""
    epoch_samples: Optional[int] = None
    """Samples per (resampled) epoch; default: the dataset size."""


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 1e-4
    """Peak learning rate."""
    betas: Tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    warmup_steps: int = 0
    """Linear lr warm-up from 0 over this many steps."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0: off)."""
    torch_adam: bool = False
    """Use torch's fused AdamW inside DeepSpeed instead of its own fused / CPU kernels (no JIT build)."""


@dataclass
class PhasesConfig:
    """The masking plan: a pure function step -> (mask ratio, lr scale, phase); see trainer.phases."""

    mask_ratio: float = 0.5
    """Mask ratio of the masked phase (at step 0 when a schedule is used)."""
    schedule: str = "constant"
    """constant, linear or cosine from mask_ratio to end_mask_ratio over the masked steps."""
    end_mask_ratio: Optional[float] = None
    """Mask ratio reached at the end of the masked steps (linear / cosine)."""
    unmask_every: int = 0
    """Every this many steps start a periodic unmask-tuning phase (0: never)."""
    unmask_steps: int = 0
    """Length of each periodic unmask-tuning phase (mask ratio 0)."""
    unmask_lr_scale: float = 1.0
    """lr multiplier during periodic unmask tuning."""
    final_unmask_steps: int = 0
    """Length of the final unmask-tuning phase at the end of the run."""
    final_unmask_lr_scale: float = 0.5
    """lr multiplier during the final unmask tuning."""


@dataclass
class EMAConfig:
    """Exponential moving average of the weights used for sampling."""

    decay: float = 0.9999
    """Target decay per step (ignored when half_life_images is set)."""
    half_life_images: Optional[float] = None
    """EDM-style: decay so that the average's half-life is this many images."""
    warmup: bool = True
    """Ramp the decay up (min(decay, (1+n)/(10+n)), or half-life <= 0.05 x images seen) so early EMAs are not noise."""
    update_every: int = 1
    """Update the EMA every this many steps (cheaper under ZeRO-3, where parameters are gathered)."""


@dataclass
class CheckpointConfig:
    """Saving and resuming."""

    every: int = 1000
    """Save every this many steps (and at the end of every unmask-tuning phase and the run)."""
    keep_last: int = 3
    """Keep the newest N periodic checkpoints; phase-end checkpoints are kept too when keep_phase_ends."""
    keep_phase_ends: bool = True
    """Never rotate away checkpoints taken at the end of an unmask-tuning phase."""
    resume: str = "auto"
    """auto (latest complete checkpoint in the run dir, if any; its mdt-universal copy when the number
    of ranks changed), none, or a checkpoint directory."""


@dataclass
class MonitorConfig:
    """Logging, sample grids and the non-finite-loss guard."""

    log_every: int = 20
    """Reduce and log metrics every this many steps (the only host syncs of the loop)."""
    tensorboard: bool = True
    """Write TensorBoard event files to run_dir/tb."""
    sample_every: int = 0
    """Log an EMA sample grid every this many steps (0: only at the end)."""
    sample_count: int = 16
    """Images in a sample grid."""
    sample_steps: int = 18
    """EDM Heun steps for sample grids."""
    guidance_scale: float = 1.5
    """Classifier-free guidance for sample grids."""
    max_nonfinite: int = 5
    """Stop the run after this many non-finite losses in a row (each is skipped and counted)."""
    peak_tflops: Optional[float] = None
    """Accelerator peak (bf16 TFLOP/s per rank) for MFU; default: measured once at start."""


@dataclass
class DeepSpeedSection:
    """Engine settings turned into DeepSpeed's JSON (see to_deepspeed_json)."""

    zero_stage: int = 2
    """ZeRO stage 0-3."""
    precision: str = "bf16"
    """bf16, fp16 or fp32."""
    offload_optimizer: bool = False
    """ZeRO-Offload of optimizer state to CPU memory (stage >= 1)."""
    contiguous_gradients: Optional[bool] = None
    """ZeRO >= 1: copy gradients into one buffer as they are produced; default on for accelerators
    (less fragmentation), off on CPU (where it is only an extra copy of every gradient)."""
    extra: Dict[str, Any] = field(default_factory=dict)
    """Advanced keys merged into the generated JSON as given (wins over generated values)."""


@dataclass
class TrainConfig:
    """A whole launch config; one section per concern."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    phases: PhasesConfig = field(default_factory=PhasesConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step; validate() guarantees it divides."""
        return self.data.batch_size // (self.data.micro_batch_size * world_size)

    def to_dict(self) -> Dict[str, Any]:
        """Plain nested dict (YAML / JSON safe)."""
        return _plain(dataclasses.asdict(self))


# ----------------------------------------------------------------------------- parsing


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check / convert a parsed YAML value against a field's type hint."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {hint.__name__} fields, got {value!r}")
        return _build(hint, value, key)
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: Dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in hints:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown key {where!r}; valid keys{' in ' + prefix if prefix else ''}: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(tree: Dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from its to_dict() form (e.g. the copy stored in a checkpoint)."""
    return _build(TrainConfig, tree)


def _set_override(tree: Dict[str, Any], assignment: str) -> None:
    """Apply one 'a.b.c=value' override (value parsed as YAML) to a nested dict."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    path, raw = assignment.split("=", 1)
    keys = path.strip().split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {path!r}: {k!r} is not a section")
    node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> TrainConfig:
    """Read a YAML launch config (or the defaults) and apply --set overrides; validates types."""
    tree: Dict[str, Any] = {}
    if path:
        try:
            with open(path) as f:
                tree = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    for item in overrides or []:
        _set_override(tree, item)
    return _build(TrainConfig, tree)


# ----------------------------------------------------------------------------- validation


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: TrainConfig, world_size: int, check_data: bool = True) -> None:
    """Semantic checks that need no process group; raises ConfigError naming the key."""
    from model_zoo.checkpointing import CHECKPOINT_MODES
    from model_zoo.registry import MODELS

    from .diffusion import PRECONDITIONINGS, SIGMA_SAMPLERS, WEIGHTINGS

    d, p = cfg.data, cfg.phases
    _check(cfg.model.name in MODELS, f"model.name: unknown model {cfg.model.name!r}; choose from {', '.join(MODELS)}")
    _check(cfg.model.activation_checkpointing in CHECKPOINT_MODES,
           f"model.activation_checkpointing: {cfg.model.activation_checkpointing!r} is not one of {CHECKPOINT_MODES}")
    _check(cfg.run.total_steps > 0, "run.total_steps must be > 0")
    _check(cfg.run.stall_timeout_s >= 0, f"run.stall_timeout_s must be >= 0 (0 disables), got {cfg.run.stall_timeout_s}")
    _check(d.micro_batch_size > 0 and d.batch_size > 0, "data.batch_size and data.micro_batch_size must be > 0")
    _check(d.batch_size % (d.micro_batch_size * world_size) == 0,
           f"data.batch_size {d.batch_size} is not divisible by data.micro_batch_size {d.micro_batch_size} "
           f"x {world_size} ranks")
    _check(cfg.diffusion.preconditioning in PRECONDITIONINGS,
           f"diffusion.preconditioning: {cfg.diffusion.preconditioning!r} is not one of {PRECONDITIONINGS}")
    _check(cfg.diffusion.sigma_sampler in SIGMA_SAMPLERS,
           f"diffusion.sigma_sampler: {cfg.diffusion.sigma_sampler!r} is not one of {SIGMA_SAMPLERS}")
    _check(cfg.diffusion.weighting in WEIGHTINGS,
           f"diffusion.weighting: {cfg.diffusion.weighting!r} is not one of {WEIGHTINGS}")
    _check(cfg.diffusion.gamma > 0, f"diffusion.gamma must be > 0, got {cfg.diffusion.gamma}")
    for key in ("mask_ratio", "end_mask_ratio"):
        value = getattr(p, key)
        _check(value is None or 0.0 <= value < 1.0, f"phases.{key} must be in [0, 1), got {value}")
    if not cfg.model.name.startswith("MaskDiT"):
        _check(p.mask_ratio == 0 and not p.end_mask_ratio,
               f"phases.mask_ratio must be 0 for {cfg.model.name} (only MaskDiT models mask tokens)")
    _check(p.schedule in ("constant", "linear", "cosine"),
           f"phases.schedule: {p.schedule!r} is not one of constant, linear, cosine")
    _check(p.unmask_every >= 0 and p.unmask_steps >= 0 and p.final_unmask_steps >= 0,
           "phases.unmask_every, unmask_steps and final_unmask_steps must be >= 0")
    _check(p.unmask_every == 0 or p.unmask_steps < p.unmask_every,
           f"phases.unmask_steps {p.unmask_steps} must be < phases.unmask_every {p.unmask_every}")
    _check(p.final_unmask_steps < cfg.run.total_steps,
           f"phases.final_unmask_steps {p.final_unmask_steps} must be < run.total_steps {cfg.run.total_steps}")
    _check(0.0 < cfg.ema.decay < 1.0, f"ema.decay must be in (0, 1), got {cfg.ema.decay}")
    _check(cfg.ema.half_life_images is None or cfg.ema.half_life_images > 0, "ema.half_life_images must be > 0")
    _check(cfg.ema.update_every >= 1, "ema.update_every must be >= 1")
    _check(cfg.checkpoint.every > 0 and cfg.checkpoint.keep_last >= 1,
           "checkpoint.every must be > 0 and checkpoint.keep_last >= 1")
    _check(cfg.monitor.log_every > 0, "monitor.log_every must be > 0")
    _check(cfg.monitor.max_nonfinite >= 1, "monitor.max_nonfinite must be >= 1")
    _check(cfg.deepspeed.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage must be 0-3, got {cfg.deepspeed.zero_stage}")
    _check(cfg.deepspeed.precision in ("bf16", "fp16", "fp32"),
           f"deepspeed.precision: {cfg.deepspeed.precision!r} is not one of bf16, fp16, fp32")
    _check(not cfg.deepspeed.offload_optimizer or cfg.deepspeed.zero_stage >= 1,
           "deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
    _check(cfg.optim.lr > 0 and cfg.optim.warmup_steps >= 0, "optim.lr must be > 0 and optim.warmup_steps >= 0")
    if check_data:
        _check(bool(d.shards), "data.shards is empty: point it at a directory made by `mdt-data encode`")
        from data_tools.format import DataToolsError

        from .data import resolve_shards

        try:
            urls, _ = resolve_shards(d.shards, d.manifest)
        except (DataToolsError, OSError) as err:
            raise ConfigError(f"data.shards: {err}") from None
        missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
        _check(not missing, f"data.shards: shard {missing[0] if missing else ''} does not exist")


# ----------------------------------------------------------------------------- DeepSpeed JSON


def _deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _accelerator_type() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def zero_section(ds: DeepSpeedSection, device_type: str) -> Dict[str, Any]:
    """DeepSpeed's zero_optimization block for these settings on a `device_type` ('cpu', 'cuda', ...)."""
    zero: Dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        contiguous = ds.contiguous_gradients if ds.contiguous_gradients is not None else device_type != "cpu"
        zero.update(overlap_comm=False, contiguous_gradients=contiguous)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    return zero


def to_deepspeed_json(cfg: TrainConfig, world_size: int, device_type: Optional[str] = None) -> Dict[str, Any]:
    """The DeepSpeed config dict for this launch config and world size on `device_type`
    (default: DeepSpeed's accelerator).

    The lr schedule is not DeepSpeed's: the phase plan scales the lr per step, so the optimizer
    is created with the peak lr and the loop sets each group's lr.
    """
    ds, o = cfg.deepspeed, cfg.optim
    zero = zero_section(ds, device_type or _accelerator_type())
    out: Dict[str, Any] = {
        "train_batch_size": cfg.data.batch_size,
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.accumulation_steps(world_size),
        "gradient_clipping": o.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
                       **({"torch_adam": True, "fused": True} if o.torch_adam else {})},
        },
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16, "loss_scale_window": 1000},
        "steps_per_print": 10**9,  # our monitor prints; keep DeepSpeed's own log quiet
        "wall_clock_breakdown": False,
    }
    return _deep_merge(out, ds.extra)


# ----------------------------------------------------------------------------- reference


def field_docs(cls: type) -> Dict[str, str]:
    """The docstring written under each field of a config dataclass (read from the source)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def reference_markdown() -> str:
    """Markdown tables of every config key with its default and docstring (for README / --reference)."""
    lines = []
    defaults = TrainConfig()
    for section in dataclasses.fields(TrainConfig):
        cls = typing.get_type_hints(TrainConfig)[section.name]
        lines += [f"**{section.name}** ({cls.__doc__.strip()})", "", "| key | default | meaning |", "|---|---|---|"]
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            value = _plain(getattr(getattr(defaults, section.name), f.name))
            lines.append(f"| `{section.name}.{f.name}` | `{value}` | {docs.get(f.name, '')} |")
        lines.append("")
    return "\n".join(lines)
