"""Preconditionings: every parameterisation as c_skip, c_out, c_in, c_noise of sigma (EDM, Karras
et al. 2022), and the Denoiser that applies one to a model_zoo network:

    x = x0 + sigma * n,            D(x; sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x; c_noise(sigma))

The VP sample x_t = sqrt(alphabar) x0 + sqrt(1 - alphabar) n is x / sqrt(sigma^2 + 1), so
c_in = 1 / sqrt(sigma^2 + 1), and epsilon-, v- and x0-prediction differ only in c_skip and c_out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, NamedTuple, Tuple

import torch
from torch import nn

if TYPE_CHECKING:  # the annotation only: the maths needs no network module at import
    from model_zoo.backbone import SkipCache

from .noise import SIGMA_CEIL, SIGMA_FLOOR, DDPMSchedule, column, ddpm_schedule_for


class RawOutput(NamedTuple):
    """Denoiser.raw's result: the network output F [B, C, H, W] (learned-variance channels
    dropped), the token mask, and with hidden_at > 0 the tapped block's tokens and their positions
    (see model_zoo.layers.ModelOutput)."""

    sample: torch.Tensor
    mask: torch.Tensor | None
    hidden: torch.Tensor | None = None
    keep_ids: torch.Tensor | None = None


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
        x = x0 + column(s, x0) * noise
        return (x0 - column(c_skip, x0) * x) / column(c_out, x0)


class EDMPrecond(Preconditioning):
    """EDM (Karras et al. 2022), as used by MaskDiT: unit-variance input and target at every sigma."""

    name = "edm"

    def __init__(self, sigma_data: float = 0.5):
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.sigma_data = sigma_data

    def scalings(self, sigma: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """EDM's c_skip, c_out, c_in and c_noise = ln(sigma) / 4."""
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

    def __init__(self, prediction: str = "eps", schedule: DDPMSchedule | None = None):
        if prediction not in ("eps", "v", "x0"):
            raise ValueError(f"unknown VP prediction {prediction!r} (choose from eps, v, x0)")
        self.prediction = prediction
        self.name = f"vp_{prediction}"
        self.schedule = schedule if schedule is not None else DDPMSchedule("linear")

    def scalings(self, sigma: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """c_skip, c_out of the prediction target, c_in = 1 / sqrt(sigma^2 + 1), c_noise = the timestep."""
        c_in = (sigma ** 2 + 1).rsqrt()
        if self.prediction == "eps":
            c_skip, c_out = torch.ones_like(sigma), -sigma
        elif self.prediction == "v":
            c_skip, c_out = c_in ** 2, -sigma * c_in
        else:
            c_skip, c_out = torch.zeros_like(sigma), torch.ones_like(sigma)
        return c_skip, c_out, c_in, self.schedule.sigma_to_t(sigma)


class FlowPrecond(Preconditioning):
    """Flow matching on the linear interpolant x_t = (1 - t) x0 + t n (SiT, Ma et al. 2024) in sigma
    form: sigma = t / (1 - t) and x_t = x / (1 + sigma), so t = sigma / (1 + sigma) and
    c_in = 1 - t. The network predicts the velocity, with SiT's conventions so that its releases
    load as they are: its time input is 1 - t (1 at the data end) and its output x0 - n (the
    negative of d x_t / dt). Then D = x_t + t F: c_skip = 1 - t, c_out = t.
    """

    name = "flow"

    def scalings(self, sigma: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """c_skip = c_in = c_noise = 1 / (1 + sigma) = 1 - t, c_out = sigma / (1 + sigma) = t."""
        one_minus_t = (1.0 + sigma).reciprocal()
        return one_minus_t, sigma * one_minus_t, one_minus_t, one_minus_t


PRECONDITIONINGS: Dict[str, Callable[[float, DDPMSchedule | None], Preconditioning]] = {
    "edm": lambda sigma_data, schedule: EDMPrecond(sigma_data),
    "vp_eps": lambda sigma_data, schedule: VPPrecond("eps", schedule),
    "vp_v": lambda sigma_data, schedule: VPPrecond("v", schedule),
    "vp_x0": lambda sigma_data, schedule: VPPrecond("x0", schedule),
    "flow": lambda sigma_data, schedule: FlowPrecond(),
}
"""Preconditionings: name -> builder(sigma_data, DDPM schedule or None)."""


def make_preconditioning(name: str, sigma_data: float = 0.5,
                         schedule: DDPMSchedule | None = None) -> Preconditioning:
    """Preconditioning by config name (see PRECONDITIONINGS)."""
    if name not in PRECONDITIONINGS:
        raise ValueError(f"unknown preconditioning {name!r} (choose from {', '.join(PRECONDITIONINGS)})")
    return PRECONDITIONINGS[name](sigma_data, schedule)


class Denoiser(nn.Module):
    """Wraps a model_zoo network F with a preconditioning: D(x; sigma, y) in sigma space.

    forward() returns the denoised estimate (what samplers need); raw() returns F, the token mask
    and, when asked, an encoder block's tokens (what the training objective needs). With
    learn_sigma networks only the first in_channels output channels are used: the learned variance
    is not trained here (MaskDiT does not use it).
    """

    def __init__(self, net: nn.Module, precond: Preconditioning):
        super().__init__()
        self.net = net
        self.precond = precond

    @property
    def num_classes(self) -> int:
        """The network's class count; label num_classes is the null (unconditional) class."""
        return self.net.num_classes

    def new_skip_cache(self, n_keep: int) -> SkipCache:
        """A fresh Skip-Cache from the network (built with skip=True) keeping n_keep blocks per end."""
        return self.net.new_skip_cache(n_keep)

    def raw(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor, mask_ratio: float = 0.0,
            skip_cache=None, reuse_cache: bool = False, hidden_at: int = 0,
            path_drop: torch.Tensor | None = None) -> RawOutput:
        """F, the mask and (hidden_at > 0) the tapped tokens for sigma-space input x [B, C, H, W],
        sigma [B]. path_drop [B] bool: the samples whose sparse path a SPRINT network drops."""
        sigma = self._per_sample(sigma, x)
        _, _, c_in, c_noise = self.precond.scalings(sigma)
        extra = {"hidden_at": hidden_at} if hidden_at else {}  # networks without the argument keep working
        if path_drop is not None:
            extra["path_drop"] = path_drop
        out = self.net(x * column(c_in, x).to(x.dtype), c_noise, y, mask_ratio=mask_ratio,
                       skip_cache=skip_cache, reuse_cache=reuse_cache, **extra)
        return RawOutput(out.sample[:, : x.shape[1]], out.mask, getattr(out, "hidden", None),
                         getattr(out, "keep_ids", None))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor, skip_cache=None,
                reuse_cache: bool = False, path_drop: torch.Tensor | None = None) -> torch.Tensor:
        """Denoised estimate D(x; sigma) [B, C, H, W] for sigma [B] or a scalar."""
        sigma = self._per_sample(sigma, x)
        f = self.raw(x, sigma, y, skip_cache=skip_cache, reuse_cache=reuse_cache, path_drop=path_drop).sample
        c_skip, c_out, _, _ = self.precond.scalings(sigma)
        return column(c_skip, x) * x + column(c_out, x) * f.to(x.dtype)

    @staticmethod
    def _per_sample(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        """sigma as float32 [B] on x's device (samplers pass one sigma for the whole batch)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.float()


def make_denoiser(net: nn.Module, preconditioning: str, sigma_data: float = 0.5,
                  sigma_sampler: str = "lognormal") -> Denoiser:
    """The network with a preconditioning by name; a DDPM sigma sampler ('ddpm_cosine') also sets the
    schedule whose timesteps a VP preconditioning feeds the network."""
    return Denoiser(net, make_preconditioning(preconditioning, sigma_data, ddpm_schedule_for(sigma_sampler)))
