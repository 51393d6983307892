"""Samplers in the sigma formulation, classifier-free guidance and Skip-Cache scheduling.

Every sampler has one signature, k-diffusion style:

    sampler(model, x, sigmas, generator=None) -> x0 estimate

model(x, sigma) -> denoised D(x; sigma) for a batch x and a python-float sigma; x starts as
noise * sigmas[0]; sigmas is a decreasing grid ending with 0. `GuidedModel` turns a Denoiser plus
labels into such a model: guidance (cond and uncond halves in one batched forward) and Skip-Cache
(full and cached steps, counted) live there, so every sampler gets both for free.

A "step" for Skip-Cache is one evaluation of the guided model: one per Euler / DDIM / DDPM step,
two per Heun step (except the last). Guided evaluations are one step, not two model calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from .noise import SIGMA_CEIL, DDPMSchedule
from .preconditioning import Denoiser

ModelFn = Callable[[torch.Tensor, float], torch.Tensor]
Sampler = Callable[..., torch.Tensor]


# ----------------------------------------------------------------------------- sigma grids


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's grid: steps sigmas evenly spaced in sigma^(1/rho) from sigma_max to sigma_min, then 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    grid = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([grid, grid.new_zeros(1)])


def ddpm_sigmas(schedule: DDPMSchedule, steps: int) -> torch.Tensor:
    """steps sigmas of a DDPM schedule at evenly spaced timesteps T-1 .. 0 (DiT's respacing), then 0.

    An infinite first sigma (zero-terminal-SNR schedules) is capped at SIGMA_CEIL: samplers must
    start from a finite x = noise * sigma.
    """
    if not 1 <= steps <= schedule.num_steps:
        raise ValueError(f"steps must be in [1, {schedule.num_steps}], got {steps}")
    t = torch.linspace(schedule.num_steps - 1, 0, steps, dtype=torch.float64).round().long()
    grid = schedule.sigmas[t].clamp(max=SIGMA_CEIL)
    return torch.cat([grid, grid.new_zeros(1)])


def flow_sigmas(steps: int, t_max: float = 0.999) -> torch.Tensor:
    """A flow-matching grid: steps times evenly spaced from t_max down to t = t_max / steps (then 0),
    as sigma = t / (1 - t); t_max < 1 keeps the first sigma finite (999 at the default)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < t_max < 1:
        raise ValueError(f"t_max must be in (0, 1), got {t_max}")
    t = torch.linspace(t_max, 0, steps + 1, dtype=torch.float64)
    return t / (1 - t)


# ----------------------------------------------------------------------------- samplers


def _floats(sigmas: torch.Tensor) -> List[float]:
    """The grid as python floats: sigma decisions then need no device sync."""
    return [float(s) for s in sigmas.detach().cpu().tolist()]


def heun_sampler(model: ModelFn, x: torch.Tensor, sigmas: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """EDM's deterministic 2nd-order Heun sampler (Karras et al. 2022, Alg. 1, no churn).

    The last step (to sigma = 0) is a plain Euler step, as the ODE's slope is undefined at 0.
    """
    s = _floats(sigmas)
    for cur, nxt in zip(s[:-1], s[1:]):
        d = (x - model(x, cur)) / cur
        x_next = x + (nxt - cur) * d
        if nxt > 0:
            d_next = (x_next - model(x_next, nxt)) / nxt
            x_next = x + (nxt - cur) * 0.5 * (d + d_next)
        x = x_next
    return x


def euler_sampler(model: ModelFn, x: torch.Tensor, sigmas: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Euler on the probability-flow ODE dx/dsigma = (x - D) / sigma; identical to DDIM (eta = 0)."""
    s = _floats(sigmas)
    for cur, nxt in zip(s[:-1], s[1:]):
        denoised = model(x, cur)
        x = denoised + (nxt / cur) * (x - denoised)
    return x


def heun_t_sampler(model: ModelFn, x: torch.Tensor, sigmas: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Heun on the flow ODE in t (SiT's sampler): x_t = x / (1 + sigma), t = sigma / (1 + sigma),
    d x_t / dt = (x_t - D) / t. Its Euler step is exactly the Euler step in sigma; its Heun step is
    not (docs/diffusion.md derives both), hence this sampler. Works on any grid; the last step
    (to t = 0) is Euler."""
    s = _floats(sigmas)
    xt = x / (1.0 + s[0])
    for cur, nxt in zip(s[:-1], s[1:]):
        t, t_next = cur / (1.0 + cur), nxt / (1.0 + nxt)
        v = (xt - model(xt * (1.0 + cur), cur)) / t
        xt_next = xt + (t_next - t) * v
        if nxt > 0:
            v_next = (xt_next - model(xt_next * (1.0 + nxt), nxt)) / t_next
            xt_next = xt + (t_next - t) * 0.5 * (v + v_next)
        xt = xt_next
    return xt * (1.0 + s[-1])


Generators = torch.Generator | Sequence[torch.Generator] | None


def step_noise(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Standard-normal noise shaped like x from one generator, or one generator per image (then
    image i's noise depends on its own generator only, not on the batch it is sampled in)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    if len(generator) != x.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
    return torch.stack([torch.randn(x.shape[1:], device=x.device, dtype=x.dtype, generator=g) for g in generator])


def ddpm_ancestral_sampler(model: ModelFn, x: torch.Tensor, sigmas: torch.Tensor,
                           generator: Generators = None) -> torch.Tensor:
    """Ancestral DDPM sampling in sigma form: the exact DDPM posterior q(x_next | x, x0 = D).

    From sigma to sigma' < sigma the posterior adds fresh noise sigma_up^2 = sigma'^2 (sigma^2 -
    sigma'^2) / sigma^2 after a deterministic move to sigma_down = sqrt(sigma'^2 - sigma_up^2); on a
    (respaced) DDPM grid this equals x_{t-1} ~ N(mu_t(x_t, x0), beta_tilde_t) of Ho et al. 2020.
    `generator`: one for the batch or one per image (see step_noise).
    """
    s = _floats(sigmas)
    for cur, nxt in zip(s[:-1], s[1:]):
        denoised = model(x, cur)
        if nxt == 0:
            x = denoised
            continue
        up = math.sqrt(nxt ** 2 * (cur ** 2 - nxt ** 2) / cur ** 2)
        down = math.sqrt(max(nxt ** 2 - up ** 2, 0.0))
        x = denoised + (down / cur) * (x - denoised) + up * step_noise(x, generator)
    return x


@dataclass(frozen=True)
class SamplerSpec:
    """A registry entry: the sampler, the sigma grid it is run on by default and its usual step count."""

    run: Sampler
    grid: str
    """'karras' (EDM's grid), 'ddpm' (the DDPM schedule's timesteps, as DiT samples) or 'flow'
    (evenly spaced in t). A flow-matching model samples on the flow grid whatever the sampler."""
    default_steps: int
    stochastic: bool = False
    """Draws noise at every step (from `generator`: one per image keeps images batch-independent)."""


SAMPLERS: Dict[str, SamplerSpec] = {
    "heun": SamplerSpec(heun_sampler, "karras", 18),
    "euler": SamplerSpec(euler_sampler, "karras", 50),
    "ddim": SamplerSpec(euler_sampler, "ddpm", 50),
    "ddpm": SamplerSpec(ddpm_ancestral_sampler, "ddpm", 250, stochastic=True),
    "heun_t": SamplerSpec(heun_t_sampler, "flow", 25),
}
"""Samplers: name -> SamplerSpec (ddim is the Euler step on the DDPM grid)."""


def default_sigmas(sampler: str, steps: int, schedule: DDPMSchedule | None = None,
                   preconditioning: str = "") -> torch.Tensor:
    """The usual grid for a sampler: EDM's for 'heun' / 'euler', the DDPM schedule's (linear unless
    given) for 'ddpm' / 'ddim', so that DiT-style runs use the timesteps the model was trained on;
    evenly spaced in t for a flow-matching model (preconditioning 'flow') and for 'heun_t'."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
    grid = "flow" if preconditioning == "flow" else SAMPLERS[sampler].grid
    if grid == "flow":
        return flow_sigmas(steps)
    if grid == "karras":
        return karras_sigmas(steps)
    return ddpm_sigmas(schedule if schedule is not None else DDPMSchedule("linear"), steps)


# ----------------------------------------------------------------------------- guidance + cache


@dataclass(frozen=True)
class SkipCacheConfig:
    """Skip-Cache schedule (Skip-DiT): after a full step, the next interval - 1 steps are cached.

    interval: N; 1 means every step is full (identical to uncached sampling).
    n_keep: blocks run at each end of the network on cached steps (the first and last n_keep).
    force_full_sigma: (lo, hi); steps with lo <= sigma <= hi always run the full model.
    """

    interval: int = 2
    n_keep: int = 1
    force_full_sigma: Tuple[float, float] | None = None

    def __post_init__(self):
        if self.interval < 1:
            raise ValueError(f"skip cache interval must be >= 1, got {self.interval}")
        if self.n_keep < 1:
            raise ValueError(f"skip cache n_keep must be >= 1, got {self.n_keep}")
        if self.force_full_sigma is not None and not 0 <= self.force_full_sigma[0] <= self.force_full_sigma[1]:
            raise ValueError(f"force_full_sigma must be (lo, hi) with 0 <= lo <= hi, got {self.force_full_sigma}")


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float, channels: int | None = None) -> torch.Tensor:
    """Classifier-free guidance uncond + scale (cond - uncond) on every channel, or on the first
    `channels` only with the rest taken from the conditional half (the DiT release's sampler guides
    3 of its 4 latent channels; `channels=3` reproduces it)."""
    guided = uncond + scale * (cond - uncond)
    if channels is None or channels >= cond.shape[1]:
        return guided
    return torch.cat([guided[:, :channels], cond[:, channels:]], dim=1)


GUIDANCE_KINDS = ("cfg", "path_drop")
"""How the weak branch of guidance is made: 'cfg', the null class (classifier-free guidance);
'path_drop', the null class with a SPRINT network's sparse path dropped (path-drop guidance: the
middle blocks do not run for that half, so a guided step costs about the dense blocks' share less)."""


class GuidedModel:
    """model(x, sigma) for samplers: a Denoiser with labels, guidance and Skip-Cache.

    denoiser(x, sigma, y, skip_cache=..., reuse_cache=..., path_drop=...) -> D, with `num_classes`
    (the null label) and, for Skip-Cache, `new_skip_cache(n_keep)`. guidance_scale s: D_weak + s
    (D_cond - D_weak) on all channels, D_weak from the null class (guidance 'cfg') or the null class
    with the sparse path dropped (guidance 'path_drop', SPRINT networks); s = 1 runs the conditional
    half only. guidance_interval (lo, hi): guide only where lo < sigma <= hi (Kynkaanniemi et al.
    2024), conditional elsewhere. guidance_channels k: guide the first k channels only (see `guide`).
    """

    def __init__(self, denoiser, y: torch.Tensor, guidance_scale: float = 1.0,
                 guidance_interval: Tuple[float, float] | None = None,
                 skip_cache: SkipCacheConfig | None = None, guidance_channels: int | None = None,
                 guidance: str = "cfg"):
        if guidance not in GUIDANCE_KINDS:
            raise ValueError(f"guidance must be one of {', '.join(GUIDANCE_KINDS)}, got {guidance!r}")
        if guidance == "path_drop" and getattr(getattr(denoiser, "net", None), "family", "") != "sprint":
            raise ValueError("path-drop guidance needs a network with a droppable sparse path (a SPRINT model)")
        self.kind = guidance
        if guidance_channels is not None and guidance_channels < 1:
            raise ValueError(f"guidance_channels must be >= 1, got {guidance_channels}")
        self.channels = guidance_channels
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        if guidance_interval is not None and not 0 <= guidance_interval[0] < guidance_interval[1]:
            raise ValueError(f"guidance_interval must be (lo, hi) with 0 <= lo < hi, got {guidance_interval}")
        self.denoiser, self.y = denoiser, y
        self.scale, self.interval = guidance_scale, guidance_interval
        self.config = skip_cache
        self.cache = denoiser.new_skip_cache(skip_cache.n_keep) if skip_cache is not None else None
        self.full_steps = 0
        self.cached_steps = 0
        self.weak_full_steps = 0  # calls that also ran the weak branch (guided), by full / cached
        self.weak_cached_steps = 0
        self._since_full = 0
        self._cached_batch: int | None = None

    def _guided(self, sigma: float) -> bool:
        if self.scale == 1.0:
            return False
        return self.interval is None or self.interval[0] < sigma <= self.interval[1]

    def _full(self, sigma: float, batch: int) -> bool:
        """Whether this step runs the whole network (and refreshes the cache)."""
        cfg = self.config
        if cfg is None or self._cached_batch != batch:  # no cache yet, or guidance toggled the batch
            return True
        if cfg.force_full_sigma is not None and cfg.force_full_sigma[0] <= sigma <= cfg.force_full_sigma[1]:
            return True
        return self._since_full + 1 >= cfg.interval

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """Denoised estimate for x [B, ...] at one sigma, guided and cached per the settings."""
        guided = self._guided(sigma)
        extra = {}
        if guided:
            null = torch.full_like(self.y, self.denoiser.num_classes)
            xb, yb = torch.cat([x, x]), torch.cat([self.y, null])
            if self.kind == "path_drop":  # the second half skips the sparse path
                extra["path_drop"] = torch.arange(len(yb), device=yb.device) >= len(self.y)
        else:
            xb, yb = x, self.y
        full = self._full(sigma, xb.shape[0])
        out = self.denoiser(xb, sigma, yb, skip_cache=self.cache, reuse_cache=not full, **extra)
        if full:
            self.full_steps += 1
            self.weak_full_steps += guided
            self._since_full = 0
            self._cached_batch = xb.shape[0]
        else:
            self.cached_steps += 1
            self.weak_cached_steps += guided
            self._since_full += 1
        if not guided:
            return out
        cond, uncond = out.chunk(2)
        return guide(cond, uncond, self.scale, self.channels)


@dataclass
class SampleResult:
    """A sampling run: the final latents and what it executed.

    full_steps / cached_steps: guided-model evaluations that ran the whole network / only the
    first and last n_keep blocks. weak_full_steps / weak_cached_steps: those of them that also ran
    guidance's weak branch. blocks_run: transformer blocks the network reports having run (None
    without Skip-Cache, where the network keeps no counter).
    """

    x: torch.Tensor
    full_steps: int
    cached_steps: int
    blocks_run: int | None
    weak_full_steps: int = 0
    weak_cached_steps: int = 0


@torch.no_grad()
def sample(denoiser: Denoiser, noise: torch.Tensor, y: torch.Tensor, sigmas: torch.Tensor, sampler: str = "heun",
           guidance_scale: float = 1.0, guidance_interval: Tuple[float, float] | None = None,
           skip_cache: SkipCacheConfig | None = None,
           generator: Generators = None, guidance_channels: int | None = None,
           guidance: str = "cfg") -> SampleResult:
    """Generate from standard-normal noise [B, C, H, W] and labels y [B] on the grid `sigmas`.

    sampler: 'heun', 'euler', 'ddim' (= euler), 'ddpm' (ancestral; uses `generator`: one, or one
    per image for batch-independent results) or 'heun_t' (Heun in flow time; what 'heun' runs for a
    flow-matching model). guidance_channels: see `guide`; guidance: see GUIDANCE_KINDS.
    Pair 'heun' / 'euler' with karras_sigmas and 'ddpm' / 'ddim' with ddpm_sigmas as a rule;
    any decreasing grid ending in 0 works with any sampler. Put the network in eval() mode first:
    in train() mode it drops labels to the null class at random.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
    if sigmas.ndim != 1 or len(sigmas) < 2 or float(sigmas[-1]) != 0 or bool((sigmas[1:] >= sigmas[:-1]).any()):
        raise ValueError("sigmas must be a 1-D decreasing grid ending with 0")
    model = GuidedModel(denoiser, y, guidance_scale, guidance_interval, skip_cache, guidance_channels, guidance)
    run = SAMPLERS[sampler].run
    if sampler == "heun" and getattr(getattr(denoiser, "precond", None), "name", "") == "flow":
        # Heun in the model's own ODE time: flow time t for a flow model (Heun in sigma needs 18
        # steps for what this does in 12 there: docs/study.md)
        run = heun_t_sampler
    x = run(model, noise * float(sigmas[0]), sigmas, generator=generator)
    blocks = model.cache.blocks_run if model.cache is not None else None
    return SampleResult(x, model.full_steps, model.cached_steps, blocks, model.weak_full_steps,
                        model.weak_cached_steps)
