"""Loss weights per noise level, defined in denoised (x0) space, w_x0(sigma) * |D - x0|^2, and
converted to the space of the network output F: since D - x0 = c_out * (F - F_target), the weight
on |F - F_target|^2 is w_x0 * c_out^2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import torch

from .noise import SIGMA_CEIL, SIGMA_FLOOR, snr
from .preconditioning import Preconditioning

# name -> x0-space weight(sigma clamped, gamma, sigma_data, preconditioning); each finite for any sigma
WEIGHTINGS: Dict[str, Callable[[torch.Tensor, float, float, Preconditioning], torch.Tensor]] = {
    "edm": lambda s, gamma, sd, pre: (s ** 2 + sd ** 2) / (s * sd) ** 2,
    "constant": lambda s, gamma, sd, pre: pre.scalings(s)[1].pow(-2),  # unit weight on F
    "snr": lambda s, gamma, sd, pre: snr(s),
    "min_snr": lambda s, gamma, sd, pre: snr(s).clamp(max=gamma),
    # = SNR * gamma / (SNR + gamma), written without 0 / 0 at SNR = 0
    "soft_min_snr": lambda s, gamma, sd, pre: 1.0 / (s ** 2 + 1.0 / gamma),
}
"""Loss weightings: name -> x0-space weight(sigma, gamma, sigma_data, preconditioning)."""


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
        return WEIGHTINGS[self.name](s, self.gamma, self.sigma_data, precond)

    def output_weight(self, sigma: torch.Tensor, precond: Preconditioning) -> torch.Tensor:
        """Weight on |F - F_target|^2 per sample [B]: x0_weight * c_out^2 (finite for any sigma)."""
        s = sigma.float().clamp(SIGMA_FLOOR, SIGMA_CEIL)
        if self.name == "constant":
            return torch.ones_like(s)  # exact 1, not 1 / c_out^2 * c_out^2 with its rounding
        c_out = precond.scalings(s)[1]
        return self.x0_weight(s, precond) * c_out ** 2
