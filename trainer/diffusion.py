"""Diffusion maths in one continuous noise-level (sigma) formulation, separate from the network.

Every parameterisation is a preconditioning of the raw network output F (EDM, Karras et al. 2022):

    x = x0 + sigma * n,            D(x; sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x; c_noise(sigma))

The VP / DDPM family fits this form with sigma = sqrt((1 - alphabar) / alphabar): the VP sample
x_t = sqrt(alphabar) x0 + sqrt(1 - alphabar) n is x / sqrt(sigma^2 + 1), so c_in = 1 / sqrt(sigma^2 + 1)
and epsilon-, v- and x0-prediction differ only in c_skip and c_out. The signal-to-noise ratio is
SNR = alphabar / (1 - alphabar) = 1 / sigma^2 for every preconditioning (the convention of Min-SNR).

Loss weights are defined in denoised (x0) space, w_x0(sigma) * |D - x0|^2, and converted to the
space of F: since D - x0 = c_out * (F - F_target), the weight on |F - F_target|^2 is w_x0 * c_out^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

# Weights and targets are computed with sigma clamped to this range so that SNR = 0 (sigma = inf)
# and SNR = inf (sigma = 0) give finite numbers in float32: sigma^2 spans 1e-16..1e16.
SIGMA_FLOOR = 1e-8
SIGMA_CEIL = 1e8

PRECONDITIONINGS = ("edm", "vp_eps", "vp_v", "vp_x0")
WEIGHTINGS = ("edm", "constant", "snr", "min_snr", "soft_min_snr")
SIGMA_SAMPLERS = ("lognormal", "ddpm_linear", "ddpm_cosine")
SCHEDULES = ("linear", "cosine")


def snr(sigma: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alphabar / (1 - alphabar) = 1 / sigma^2 (finite: sigma is clamped)."""
    return sigma.clamp(SIGMA_FLOOR, SIGMA_CEIL).pow(-2)


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample values [B] so they broadcast over a batch like `like` [B, ...]."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


# ----------------------------------------------------------------------------- DDPM schedules


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
        self.kind, self.num_steps = kind, num_steps
        if kind == "linear":
            betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
            alphabar = torch.cumprod(1.0 - betas, 0)
        else:
            s = 0.008
            steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
            f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1.0 - f[1:] / f[:-1]).clamp(max=0.999)
            alphabar = torch.cumprod(1.0 - betas, 0)
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


# ----------------------------------------------------------------------------- preconditionings


class Preconditioning:
    """c_skip, c_out, c_in, c_noise as functions of sigma; subclasses define `scalings`."""

    name = "base"

    def scalings(self, sigma: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in, c_noise) for per-sample sigma [B]; each [B]."""
        raise NotImplementedError

    def target(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """F_target such that D = x0 exactly: (x0 - c_skip * x) / c_out with x = x0 + sigma * n."""
        s = sigma.clamp(SIGMA_FLOOR, SIGMA_CEIL)
        c_skip, c_out, _, _ = self.scalings(s)
        x = x0 + _col(s, x0) * noise
        return (x0 - _col(c_skip, x0) * x) / _col(c_out, x0)


class EDMPrecond(Preconditioning):
    """EDM (Karras et al. 2022), as used by MaskDiT: unit-variance input and target at every sigma."""

    name = "edm"

    def __init__(self, sigma_data: float = 0.5):
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.sigma_data = sigma_data

    def scalings(self, sigma):
        sd2 = self.sigma_data ** 2
        total = sigma ** 2 + sd2
        c_skip = sd2 / total
        c_out = sigma * self.sigma_data / total.sqrt()
        c_in = total.rsqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


class VPPrecond(Preconditioning):
    """VP / DDPM in sigma form, predicting 'eps', 'v' or 'x0'; c_noise is the (fractional) timestep.

    With x_t = x / sqrt(sigma^2 + 1): eps-prediction D = x - sigma * F; v-prediction
    (v = sqrt(alphabar) eps - sqrt(1 - alphabar) x0) D = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * F;
    x0-prediction D = F.
    """

    def __init__(self, prediction: str = "eps", schedule: Optional[DDPMSchedule] = None):
        if prediction not in ("eps", "v", "x0"):
            raise ValueError(f"unknown VP prediction {prediction!r} (choose from eps, v, x0)")
        self.prediction = prediction
        self.name = f"vp_{prediction}"
        self.schedule = schedule if schedule is not None else DDPMSchedule("linear")

    def scalings(self, sigma):
        c_in = (sigma ** 2 + 1).rsqrt()
        if self.prediction == "eps":
            c_skip, c_out = torch.ones_like(sigma), -sigma
        elif self.prediction == "v":
            c_skip, c_out = c_in ** 2, -sigma * c_in
        else:
            c_skip, c_out = torch.zeros_like(sigma), torch.ones_like(sigma)
        return c_skip, c_out, c_in, self.schedule.sigma_to_t(sigma)


def make_preconditioning(name: str, sigma_data: float = 0.5,
                         schedule: Optional[DDPMSchedule] = None) -> Preconditioning:
    """Preconditioning by config name: 'edm', 'vp_eps', 'vp_v' or 'vp_x0'."""
    if name == "edm":
        return EDMPrecond(sigma_data)
    if name in ("vp_eps", "vp_v", "vp_x0"):
        return VPPrecond(name[3:], schedule)
    raise ValueError(f"unknown preconditioning {name!r} (choose from {', '.join(PRECONDITIONINGS)})")


# ----------------------------------------------------------------------------- sigma sampling


class LogNormalSigma:
    """EDM training noise levels: ln(sigma) ~ N(P_mean, P_std^2)."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        if not p_std > 0:
            raise ValueError(f"p_std must be > 0, got {p_std}")
        self.p_mean, self.p_std = p_mean, p_std

    def __call__(self, batch_size: int, device: torch.device | str = "cpu",
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draw batch_size sigmas (float32) on device."""
        z = torch.randn(batch_size, device=device, generator=generator)
        return (self.p_mean + self.p_std * z).exp()


class DiscreteSigma:
    """DDPM training noise levels: t uniform over the schedule's steps, sigma = sigma_t."""

    def __init__(self, schedule: DDPMSchedule):
        self.schedule = schedule

    def __call__(self, batch_size: int, device: torch.device | str = "cpu",
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draw batch_size sigmas (float32) on device."""
        t = torch.randint(0, self.schedule.num_steps, (batch_size,), device=device, generator=generator)
        return self.schedule.t_to_sigma(t)


def ddpm_schedule_for(sigma_sampler: str) -> Optional[DDPMSchedule]:
    """The default DDPM schedule a sigma sampler name implies ('ddpm_cosine' -> cosine), else None."""
    return DDPMSchedule(sigma_sampler[len("ddpm_"):]) if sigma_sampler in ("ddpm_linear", "ddpm_cosine") else None


def make_sigma_sampler(name: str, p_mean: float = -1.2, p_std: float = 1.2,
                       schedule: Optional[DDPMSchedule] = None):
    """Sigma sampler by config name: 'lognormal', 'ddpm_linear' or 'ddpm_cosine'.

    For the DDPM kinds a given schedule is used when its kind matches, else a default one is built.
    """
    if name == "lognormal":
        return LogNormalSigma(p_mean, p_std)
    if name in ("ddpm_linear", "ddpm_cosine"):
        return DiscreteSigma(schedule if schedule is not None and schedule.kind == name[5:] else ddpm_schedule_for(name))
    raise ValueError(f"unknown sigma sampler {name!r} (choose from {', '.join(SIGMA_SAMPLERS)})")


# ----------------------------------------------------------------------------- loss weights


@dataclass(frozen=True)
class LossWeighting:
    """A per-noise-level loss weight, defined in x0 space and converted to network-output space.

    name: 'edm' (EDM's lambda = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2), 'constant'
    (unit weight on the network output: DiT's plain epsilon-MSE for vp_eps), 'snr' (SNR),
    'min_snr' (min(SNR, gamma), Hang et al. 2023) or 'soft_min_snr' (SNR * gamma / (SNR + gamma),
    Crowson et al. 2024). gamma: the Min-SNR cap (default 5). sigma_data: used by 'edm' only.
    """

    name: str = "min_snr"
    gamma: float = 5.0
    sigma_data: float = 0.5

    def __post_init__(self):
        if self.name not in WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {self.name!r} (choose from {', '.join(WEIGHTINGS)})")
        if not self.gamma > 0:
            raise ValueError(f"loss weighting gamma must be > 0, got {self.gamma}")
        if not self.sigma_data > 0:
            raise ValueError(f"loss weighting sigma_data must be > 0, got {self.sigma_data}")

    def x0_weight(self, sigma: torch.Tensor, precond: Preconditioning) -> torch.Tensor:
        """Weight on |D - x0|^2 per sample [B]; finite for any sigma in [0, inf]."""
        s = sigma.float().clamp(SIGMA_FLOOR, SIGMA_CEIL)
        r = snr(s)
        if self.name == "edm":
            return (s ** 2 + self.sigma_data ** 2) / (s * self.sigma_data) ** 2
        if self.name == "constant":
            return precond.scalings(s)[1].pow(-2)
        if self.name == "snr":
            return r
        if self.name == "min_snr":
            return r.clamp(max=self.gamma)
        return 1.0 / (s ** 2 + 1.0 / self.gamma)  # = SNR * gamma / (SNR + gamma), no 0/0 at SNR = 0

    def output_weight(self, sigma: torch.Tensor, precond: Preconditioning) -> torch.Tensor:
        """Weight on |F - F_target|^2 per sample [B]: x0_weight * c_out^2 (finite for any sigma)."""
        s = sigma.float().clamp(SIGMA_FLOOR, SIGMA_CEIL)
        if self.name == "constant":
            return torch.ones_like(s)  # exact 1, not 1 / c_out^2 * c_out^2 with its rounding
        c_out = precond.scalings(s)[1]
        return self.x0_weight(s, precond) * c_out ** 2


# ----------------------------------------------------------------------------- the denoiser


class Denoiser(nn.Module):
    """Wraps a model_zoo network F with a preconditioning: D(x; sigma, y) in sigma space.

    forward() returns the denoised estimate (what samplers need); raw() returns F and the token mask
    (what the training objective needs). With learn_sigma networks only the first in_channels output
    channels are used: the learned variance is not trained here (MaskDiT does not use it).
    """

    def __init__(self, net: nn.Module, precond: Preconditioning):
        super().__init__()
        self.net = net
        self.precond = precond

    @property
    def num_classes(self) -> int:
        """The network's class count; label num_classes is the null (unconditional) class."""
        return self.net.num_classes

    def new_skip_cache(self, n_keep: int):
        """A fresh Skip-Cache from the network (built with skip=True) keeping n_keep blocks per end."""
        return self.net.new_skip_cache(n_keep)

    def raw(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor, mask_ratio: float = 0.0,
            skip_cache=None, reuse_cache: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(F [B, C, H, W], mask [B, N] or None) for sigma-space input x [B, C, H, W], sigma [B]."""
        sigma = self._per_sample(sigma, x)
        _, _, c_in, c_noise = self.precond.scalings(sigma)
        out = self.net(x * _col(c_in, x).to(x.dtype), c_noise, y, mask_ratio=mask_ratio,
                       skip_cache=skip_cache, reuse_cache=reuse_cache)
        return out.sample[:, : x.shape[1]], out.mask

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor, skip_cache=None,
                reuse_cache: bool = False) -> torch.Tensor:
        """Denoised estimate D(x; sigma) [B, C, H, W] for sigma [B] or a scalar."""
        sigma = self._per_sample(sigma, x)
        f, _ = self.raw(x, sigma, y, skip_cache=skip_cache, reuse_cache=reuse_cache)
        c_skip, c_out, _, _ = self.precond.scalings(sigma)
        return _col(c_skip, x) * x + _col(c_out, x) * f.to(x.dtype)

    @staticmethod
    def _per_sample(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        """sigma as float32 [B] on x's device (samplers pass one sigma for the whole batch)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.float()
