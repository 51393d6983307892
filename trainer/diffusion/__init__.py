"""Diffusion maths as small pure functions on plain arguments, separate from the network: noise
levels and schedules (`noise`), preconditionings and the Denoiser (`preconditioning`), loss weights
(`weighting`), the MaskDiT objective (`objective`) and samplers with guidance and Skip-Cache
(`samplers`). Nothing here knows the launch config, the training run or DeepSpeed.

Each name a config can give (preconditioning, weighting, sigma sampler, DDPM schedule, sampler)
comes from one registry dict here, used both to validate the config and to build the object.
"""

from .noise import (
    SCHEDULES,
    SIGMA_CEIL,
    SIGMA_FLOOR,
    SIGMA_SAMPLERS,
    DDPMSchedule,
    DiscreteSigma,
    LogNormalSigma,
    SigmaSampler,
    column,
    ddpm_schedule_for,
    make_sigma_sampler,
    snr,
)
from .objective import (
    Alignment,
    LossOutput,
    alignment_loss,
    maskdit_loss,
    normalize_patches,
    per_token_mse,
    training_losses,
)
from .preconditioning import (
    PRECONDITIONINGS,
    Denoiser,
    EDMPrecond,
    FlowPrecond,
    Preconditioning,
    VPPrecond,
    make_denoiser,
    make_preconditioning,
)
from .samplers import (
    GUIDANCE_KINDS,
    SAMPLERS,
    GuidedModel,
    SampleResult,
    SamplerSpec,
    SkipCacheConfig,
    ddpm_sigmas,
    default_sigmas,
    flow_sigmas,
    karras_sigmas,
    sample,
)
from .weighting import WEIGHTINGS, LossWeighting

__all__ = [
    "SCHEDULES", "SIGMA_CEIL", "SIGMA_FLOOR", "SIGMA_SAMPLERS", "DDPMSchedule", "DiscreteSigma", "LogNormalSigma",
    "SigmaSampler", "column", "ddpm_schedule_for", "make_sigma_sampler", "snr",
    "Alignment", "LossOutput", "alignment_loss", "maskdit_loss", "normalize_patches", "per_token_mse",
    "training_losses",
    "PRECONDITIONINGS", "Denoiser", "EDMPrecond", "FlowPrecond", "Preconditioning", "VPPrecond", "make_denoiser",
    "make_preconditioning",
    "GUIDANCE_KINDS", "SAMPLERS", "GuidedModel", "SampleResult", "SamplerSpec", "SkipCacheConfig", "ddpm_sigmas",
    "default_sigmas",
    "flow_sigmas", "karras_sigmas", "sample",
    "WEIGHTINGS", "LossWeighting",
]
