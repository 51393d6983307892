"""Noise levels in one continuous formulation: sigma, the SNR, DDPM schedules seen through their
sigmas, and the samplers of training noise levels (each registry maps a config name to a builder).

The VP / DDPM family fits the sigma form with sigma = sqrt((1 - alphabar) / alphabar), and the
signal-to-noise ratio is SNR = alphabar / (1 - alphabar) = 1 / sigma^2 for every parameterisation
(the convention of Min-SNR).
"""

from __future__ import annotations

import math
from typing import Callable, Dict

import torch

# Weights and targets are computed with sigma clamped to this range so that SNR = 0 (sigma = inf)
# and SNR = inf (sigma = 0) give finite numbers in float32: sigma^2 spans 1e-16..1e16.
SIGMA_FLOOR = 1e-8
SIGMA_CEIL = 1e8


def snr(sigma: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alphabar / (1 - alphabar) = 1 / sigma^2 (finite: sigma is clamped)."""
    return sigma.clamp(SIGMA_FLOOR, SIGMA_CEIL).pow(-2)


def column(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample values [B] so they broadcast over a batch like `like` [B, ...]."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


# ----------------------------------------------------------------------------- DDPM schedules


def _linear_alphabar(num_steps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0)


def _cosine_alphabar(num_steps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    s = 0.008
    steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1.0 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1.0 - betas, 0)


SCHEDULES: Dict[str, Callable[[int, float, float], torch.Tensor]] = {
    "linear": _linear_alphabar,
    "cosine": _cosine_alphabar,
}
"""DDPM schedule kinds: name -> alphabar over the steps (betas used by 'linear' only)."""

ZERO_SNR_SUFFIX = "_zsnr"
"""A sigma sampler name ending in this ('ddpm_linear_zsnr') uses the zero-terminal-SNR version."""


class DDPMSchedule:
    """A discrete VP schedule (num_steps values of alphabar) seen through its sigmas.

    kind 'linear': betas linear from beta_start to beta_end (DDPM / DiT: 1e-4..0.02 over 1000).
    kind 'cosine': Nichol & Dhariwal's alphabar(t) = cos^2(((t/T) + s) / (1 + s) * pi/2), betas <= 0.999.
    zero_terminal_snr: rescale sqrt(alphabar) so the last step has SNR = 0 (Lin et al. 2024); its
    sigma is then inf, which weights and the objective handle through the clamp above.
    """

    def __init__(self, kind: str = "linear", num_steps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02, zero_terminal_snr: bool = False):
        if kind not in SCHEDULES:
            raise ValueError(f"unknown DDPM schedule kind {kind!r} (choose from {', '.join(SCHEDULES)})")
        if num_steps < 2:
            raise ValueError(f"DDPM schedule num_steps must be >= 2, got {num_steps}")
        if not 0.0 < beta_start < beta_end < 1.0:
            raise ValueError(f"DDPM betas need 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
        self.kind, self.num_steps, self.zero_terminal_snr = kind, num_steps, zero_terminal_snr
        alphabar = SCHEDULES[kind](num_steps, beta_start, beta_end)
        if zero_terminal_snr:
            root = alphabar.sqrt()
            first, last = root[0].clone(), root[-1].clone()
            root = (root - last) * first / (first - last)  # shift so the end is 0, keep the start
            alphabar = root ** 2
        self.alphabar = alphabar
        # sigma_t = sqrt((1 - alphabar) / alphabar); inf where alphabar == 0 (zero terminal SNR).
        self.sigmas = ((1.0 - alphabar) / alphabar).sqrt()
        # float32 copies for lookups on the training device: some accelerators have no float64.
        self._sigmas32 = self.sigmas.float()
        self._log_sigmas32 = self.sigmas.clamp(SIGMA_FLOOR, SIGMA_CEIL).log().float()

    @property
    def name(self) -> str:
        """The schedule as named in sigma sampler names: 'linear', 'cosine_zsnr', ..."""
        return self.kind + (ZERO_SNR_SUFFIX if self.zero_terminal_snr else "")

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep for sigma, interpolating linearly in log sigma (clamped to [0, T-1]).

        Computed in float32 (about 1e-4 of a step at worst), returned in sigma's dtype.
        """
        log_s = sigma.float().clamp(SIGMA_FLOOR, SIGMA_CEIL).log()
        table = self._log_sigmas32.to(log_s.device)
        hi = torch.searchsorted(table, log_s.contiguous()).clamp(1, self.num_steps - 1)
        lo = hi - 1
        w = ((log_s - table[lo]) / (table[hi] - table[lo])).clamp(0.0, 1.0)
        return (lo + w).to(sigma.dtype if sigma.is_floating_point() else torch.float32)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma at integer timesteps t (long tensor), as float32 on t's device."""
        return self._sigmas32.to(t.device)[t]


# ----------------------------------------------------------------------------- training noise levels


class LogNormalSigma:
    """EDM training noise levels: ln(sigma) ~ N(P_mean, P_std^2)."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        if not p_std > 0:
            raise ValueError(f"p_std must be > 0, got {p_std}")
        self.p_mean, self.p_std = p_mean, p_std

    def __call__(self, batch_size: int, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw batch_size sigmas (float32) on device."""
        z = torch.randn(batch_size, device=device, generator=generator)
        return (self.p_mean + self.p_std * z).exp()


class DiscreteSigma:
    """DDPM training noise levels: t uniform over the schedule's steps, sigma = sigma_t."""

    def __init__(self, schedule: DDPMSchedule):
        self.schedule = schedule

    def __call__(self, batch_size: int, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw batch_size sigmas (float32) on device."""
        t = torch.randint(0, self.schedule.num_steps, (batch_size,), device=device, generator=generator)
        return self.schedule.t_to_sigma(t)


FLOW_T_MAX = 1.0 - 1e-6
"""The largest t a flow sampler draws (sigma = t / (1 - t) stays finite)."""


class FlowTimeSigma:
    """Flow-matching training times: t uniform on (0, 1), or logit-normal (logit t ~ N(0, 1), as
    in SD3), as sigma = t / (1 - t)."""

    def __init__(self, kind: str = "logit_normal"):
        if kind not in ("uniform", "logit_normal"):
            raise ValueError(f"unknown flow time distribution {kind!r} (uniform or logit_normal)")
        self.kind = kind

    def __call__(self, batch_size: int, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw batch_size sigmas (float32) on device."""
        if self.kind == "uniform":
            t = torch.rand(batch_size, device=device, generator=generator)
        else:
            t = torch.randn(batch_size, device=device, generator=generator).sigmoid()
        t = t.clamp(max=FLOW_T_MAX)
        return t / (1.0 - t)


def ddpm_schedule_for(sigma_sampler: str) -> DDPMSchedule | None:
    """The DDPM schedule a sigma sampler name implies ('ddpm_cosine' -> cosine), else None.

    One schedule serves the training noise levels, the VP preconditioning's timestep input and the
    DDPM sampler grid: a cosine-trained network must not be fed linear-schedule timesteps.
    """
    if not sigma_sampler.startswith("ddpm_"):
        return None
    kind = sigma_sampler[len("ddpm_"):]
    zero_snr = kind.endswith(ZERO_SNR_SUFFIX)
    return DDPMSchedule(kind[:-len(ZERO_SNR_SUFFIX)] if zero_snr else kind, zero_terminal_snr=zero_snr)


SigmaSampler = Callable[..., torch.Tensor]

SIGMA_SAMPLERS: Dict[str, Callable[[float, float, DDPMSchedule | None], SigmaSampler]] = {
    "lognormal": lambda p_mean, p_std, schedule: LogNormalSigma(p_mean, p_std),
    "flow_uniform": lambda p_mean, p_std, schedule: FlowTimeSigma("uniform"),
    "flow_logit_normal": lambda p_mean, p_std, schedule: FlowTimeSigma("logit_normal"),
    # one uniform-timestep sampler per DDPM schedule: ddpm_linear, ddpm_cosine, ddpm_linear_zsnr, ...
    **{f"ddpm_{kind}{suffix}": (lambda p_mean, p_std, schedule, kind=kind, zero=bool(suffix):
                                DiscreteSigma(schedule or DDPMSchedule(kind, zero_terminal_snr=zero)))
       for kind in SCHEDULES for suffix in ("", ZERO_SNR_SUFFIX)},
}
"""Training noise-level samplers: name -> builder(p_mean, p_std, schedule)."""


def make_sigma_sampler(name: str, p_mean: float = -1.2, p_std: float = 1.2,
                       schedule: DDPMSchedule | None = None) -> SigmaSampler:
    """Sigma sampler by config name (see SIGMA_SAMPLERS).

    For the DDPM kinds a given schedule is used when its kind matches, else a default one is built.
    """
    if name not in SIGMA_SAMPLERS:
        raise ValueError(f"unknown sigma sampler {name!r} (choose from {', '.join(SIGMA_SAMPLERS)})")
    if schedule is not None and name != f"ddpm_{schedule.name}":  # a schedule of another kind
        schedule = None
    return SIGMA_SAMPLERS[name](p_mean, p_std, schedule)
