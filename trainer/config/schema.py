"""The launch-config schema: one typed dataclass per section, a docstring under every field (they
generate the config reference), derived values as methods. Parsing is trainer.config.parsing,
checks trainer.config.validation."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Tuple

from torch import nn

from ..diffusion import Denoiser, make_denoiser


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

    stop_file: str | None = None
    """While the run trains, creating this file makes it remove the file, finish the step, save a
    checkpoint and exit with status 5 (as SIGTERM / SIGUSR1 / Ctrl-C do); null: RUN_DIR/STOP."""
    time_limit_s: float | None = None
    """A wall-time budget: after the first step whose training time (evaluation excluded, resumed
    runs included) passes it, the run saves, evaluates and ends as if total_steps were reached
    (the phase plan stays laid out over total_steps). null: no limit."""

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
    """Per-block recomputation in backward ('torch' is non-reentrant; 'none' keeps every activation)."""
    offload_activations: bool = False
    """With fairscale checkpointing: keep block inputs on the CPU (the only mode that can; see
    model_zoo.checkpointing for why DeepSpeed's cpu_checkpointing cannot serve these networks)."""
    compile: bool = False
    """torch.compile the network (after DeepSpeed wraps it). It compiles once per kept-token count
    (each phase's mask ratio, or each of phases.schedule_levels levels of a schedule); the progress
    output says when it compiles."""
    compile_backend: str = "inductor"
    """The torch.compile backend (aot_eager or eager trace without generating kernels: for checks)."""
    init_from: str = ""
    """Start the run from these weights (fine-tuning): a checkpoint directory, an mdt-export file or a
    published DiT / SiT / MaskDiT release (.pt). Loaded before ZeRO partitions them; the EMA starts
    from them; optimizer fresh, step 0. Tensors the source lacks or holds in another shape (a new
    decoder, skip branches, another class count) are named in one line and initialised as usual.
    Ignored when the run resumes from its own checkpoint."""
    init_strict: bool = False
    """Refuse (before launch) an init_from source that does not cover every tensor of the model
    exactly, or holds tensors the model does not use."""


@dataclass
class DiffusionConfig:
    """Noise levels, parameterisation and loss (see trainer.diffusion)."""

    preconditioning: str = "edm"
    """The parameterisation of the network output (EDM; VP with epsilon-, v- or x0-prediction; flow:
    flow matching on the linear interpolant with velocity prediction, SiT's conventions)."""
    sigma_sampler: str = "lognormal"
    """Training noise levels: EDM's log-normal sigma, uniform timesteps of a DDPM schedule, or
    flow-matching times t (uniform, or logit-normal (0, 1)) as sigma = t / (1 - t)."""
    p_mean: float = -1.2
    """Mean of ln(sigma) for the lognormal sampler."""
    p_std: float = 1.2
    """Std of ln(sigma) for the lognormal sampler."""
    sigma_data: float = 0.5
    """Data standard deviation assumed by EDM preconditioning and weighting."""
    weighting: str = "min_snr"
    """Loss weight per noise level, defined in x0 space (min_snr: min(SNR, gamma), Hang et al. 2023)."""
    gamma: float = 5.0
    """Min-SNR cap."""
    lambda_mae: float = 0.1
    """Weight of MaskDiT's MAE reconstruction of masked tokens."""

    def denoiser(self, net: nn.Module) -> Denoiser:
        """The network with this preconditioning (and the DDPM schedule the sigma sampler implies)."""
        return make_denoiser(net, self.preconditioning, self.sigma_data, self.sigma_sampler)


@dataclass
class AlignConfig:
    """Representation alignment (REPA, Yu et al. 2024): a training-only head on an encoder block's
    tokens is pulled towards a frozen teacher's patch features, stored in the shards by
    `mdt-data encode --features TEACHER`. With masking only the kept tokens are aligned."""

    lambda_align: float = 0.0
    """Weight of the alignment loss (negative cosine similarity per token); 0 turns it off. REPA
    uses 0.5."""
    block: int = 0
    """The encoder block (1-based) whose output is aligned; 0: a third of the depth, rounded up
    (REPA's 8 of SiT-XL's 28 blocks, 4 of SiT-B's 12)."""
    head_hidden: int = 2048
    """Width of the head's two hidden layers (an MLP with SiLU, as REPA's projector)."""

    @property
    def enabled(self) -> bool:
        """Whether the run aligns (lambda_align > 0)."""
        return self.lambda_align > 0

    def block_for(self, depth: int) -> int:
        """The aligned block of a network with `depth` encoder blocks."""
        return self.block if self.block else max(1, -(-depth // 3))


@dataclass
class DataConfig:
    """The latent stream (see trainer.training.data)."""

    shards: str = ""
    """Dataset directory, manifest.json, brace pattern, or pipe: URL."""
    manifest: str | None = None
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
    epoch_samples: int | None = None
    """Samples per (resampled) epoch; default: the dataset size."""
    val_shards: str | None = None
    """Held-out data for eval's validation loss (a dataset directory, manifest or pattern, as shards)."""
    val_fraction: float = 0.0
    """Without val_shards: hold out this share of the shards (the last ones) from training for the
    validation loss."""


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
    lr_schedule: str = "constant"
    """After the warm-up: constant, or a linear or cosine decay to min_lr at the last step (times
    each phase's lr scale)."""
    min_lr: float = 0.0
    """The floor a decaying lr_schedule reaches at the last step."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0: off)."""
    torch_adam: bool = False
    """Use torch's fused AdamW inside DeepSpeed instead of its own fused / CPU kernels (no JIT build)."""


@dataclass
class PhasesConfig:
    """The masking plan: a pure function step -> (mask ratio, lr scale, phase); see trainer.config.phases."""

    mask_ratio: float = 0.5
    """Mask ratio of the masked phase (at step 0 when a schedule is used)."""
    schedule: str = "constant"
    """Shape of the way from mask_ratio to end_mask_ratio over the masked steps."""
    end_mask_ratio: float | None = None
    """Mask ratio reached at the end of the masked steps (linear / cosine)."""
    schedule_levels: int = 8
    """A schedule moves the mask ratio in this many equal steps from mask_ratio to end_mask_ratio,
    so a compiled model meets a few token counts (at most levels + 1, plus 0 for unmask tuning);
    0: a new ratio every step."""
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
    half_life_images: float | None = None
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


NONFINITE_ACTIONS = ("stop", "rollback")
"""monitor.on_nonfinite: what a divergence does (trainer.training.recovery)."""


@dataclass
class MonitorConfig:
    """Logging, sample grids and the non-finite guard."""

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
    """Skipped updates in a row that make a divergence: an update whose gradients are not finite
    on some rank is skipped on every rank, counted, and its step tried again with new data; this
    many in a row and the run stops or rolls back (on_nonfinite)."""
    on_nonfinite: str = "stop"
    """What a divergence does: stop (exit 3, the last checkpoint intact) or rollback (reload the
    last checkpoint on every rank, skip the data that led there, lower the learning rate for a
    while; stop after max_rollbacks)."""
    max_rollbacks: int = 3
    """Rollbacks a run may make (on_nonfinite: rollback); the next divergence stops it."""
    rollback_lr_scale: float = 0.5
    """Learning-rate factor for the steps after a rollback."""
    rollback_lr_steps: int = 500
    """How many steps after the checkpoint rolled back to train at the lowered learning rate."""
    spike_factor: float = 0.0
    """A loss above this many times its running median (the phase's last 200 steps) for
    spike_steps steps in a row is a divergence too; 0: off."""
    spike_steps: int = 5
    """Steps in a row above spike_factor x the median that make a spike."""
    peak_tflops: float | None = None
    """Accelerator peak (bf16 TFLOP/s per rank) for MFU; default: measured once at start."""


@dataclass
class DeepSpeedSection:
    """Engine settings turned into DeepSpeed's JSON (see to_deepspeed_json)."""

    zero_stage: int = 2
    """ZeRO stage 0-3."""
    precision: str = "bf16"
    """Training precision of the engine."""
    offload_optimizer: bool = False
    """ZeRO-Offload of optimizer state to CPU memory (stage >= 1)."""
    contiguous_gradients: bool | None = None
    """ZeRO >= 1: copy gradients into one buffer as they are produced; default on for accelerators
    (less fragmentation), off on CPU (where it is only an extra copy of every gradient)."""
    extra: Dict[str, Any] = field(default_factory=dict)
    """Advanced keys merged into the generated JSON as given (wins over generated values)."""


@dataclass
class EvalConfig:
    """Evaluation inside the run, from the EMA weights, spread over the ranks (off by default)."""

    every: int = 0
    """Evaluate every this many steps, at the end of every unmask-tuning phase and at the end of the
    run (0: never; then nothing here costs anything)."""
    metrics: List[str] = field(default_factory=lambda: ["val_loss"])
    """What to measure: val_loss (denoising error on held-out data at fixed noise levels), digits
    (digits Frechet distance and class accuracy of the held-out classifier; digits data only), fid
    (Inception FID against reference statistics), mnist (the same as digits by the MNIST judge;
    MNIST data only)."""
    num_images: int = 200
    """Images generated per guidance scale for the sample metrics (digits, fid, mnist)."""
    guidance_scales: List[float] = field(default_factory=lambda: [1.0])
    """Guidance scales to judge at; metrics at a scale g != 1 are named NAME@gG."""
    guidance: str = "cfg"
    """The weak branch of guidance: cfg (the null class: classifier-free guidance) or path_drop (the
    null class with a SPRINT model's sparse path skipped: path-drop guidance)."""
    sampler: str = "heun"
    """Sampler for the evaluation images."""
    steps: int = 18
    """Sampling steps for the evaluation images."""
    skip_cache: int | None = None
    """Skip-Cache interval for the evaluation images (models with skip branches; about halves the
    cost at interval 2). null: full network at every step."""
    batch_size: int = 50
    """Images (and validation samples) per forward; work is dealt to ranks in whole batches, so a
    result does not depend on the number of ranks."""
    seed: int = 0
    """Seed of the evaluation's noise: image i and validation sample j use the same noise in every
    evaluation and on any number of ranks."""
    val_samples: int = 256
    """Held-out samples for the validation loss (data.val_shards or data.val_fraction)."""
    val_sigmas: List[float] = field(default_factory=lambda: [0.02, 0.1, 0.3, 0.7, 1.5, 4.0, 15.0])
    """Noise levels of the validation loss: E|D(x0 + sigma n) - x0|^2 per level, in x0 space so that
    runs with different loss weightings compare."""
    inception: str | None = None
    """FID Inception weights (pt_inception-2015-12-05-6726825d.pth); null: $MDT_INCEPTION_WEIGHTS."""
    fid_reference: str | None = None
    """Reference statistics for FID: an .npz with mu / sigma (ADM's reference batches hold them) or
    images (arr_0); null: statistics of fid_reference_images training samples decoded through the
    dataset's VAE, computed once and cached beside the manifest."""
    fid_reference_images: int = 10000
    """Training samples behind the computed reference statistics."""


@dataclass
class TrainConfig:
    """A whole launch config; one section per concern."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    phases: PhasesConfig = field(default_factory=PhasesConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step; validate() guarantees it divides."""
        return self.data.batch_size // (self.data.micro_batch_size * world_size)

    def to_dict(self) -> Dict[str, Any]:
        """Plain nested dict (YAML / JSON safe)."""
        return plain(dataclasses.asdict(self))

    def model_kwargs(self, latent_shape: Sequence[int], num_classes: int) -> Dict[str, Any]:
        """Constructor arguments of the network: data-derived sizes, then model.options."""
        channels, height, width = latent_shape
        if height != width:
            raise ValueError(f"latents must be square, the dataset's are {height}x{width}")
        kwargs = dict(input_size=height, in_channels=channels, num_classes=num_classes, skip=self.model.skip,
                      class_dropout_prob=self.model.class_dropout_prob)
        kwargs.update(self.model.options)
        return kwargs


def plain(value: Any) -> Any:
    """Tuples as lists, recursively: a YAML / JSON safe copy of a dataclass's asdict()."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
