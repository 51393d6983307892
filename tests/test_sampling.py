"""Samplers, classifier-free guidance and Skip-Cache scheduling (trainer/diffusion/samplers.py)."""

import math

import pytest
import torch

from model_zoo.registry import build_model
from trainer.diffusion import DDPMSchedule, Denoiser, make_preconditioning
from trainer.diffusion.samplers import (
    GuidedModel,
    SkipCacheConfig,
    ddpm_ancestral_sampler,
    ddpm_sigmas,
    default_sigmas,
    euler_sampler,
    heun_sampler,
    karras_sigmas,
    sample,
)

TINY = dict(input_size=8, in_channels=4, num_classes=10, hidden_size=32, depth=4, num_heads=2)


class GaussianMixture:
    """A 2-D mixture of isotropic Gaussians with its exact denoiser E[x0 | x0 + sigma n = x].

    Label k conditions on component k; label num_classes (the null class) means the whole mixture.
    For component k the posterior mean is mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k); the mixture's
    is the average of those weighted by the responsibilities pi_k N(x; mu_k, (s_k^2 + sigma^2) I).
    """

    num_classes = 2

    def __init__(self):
        self.mu = torch.tensor([[-2.0, 1.0], [1.5, -1.0]], dtype=torch.float64)
        self.s = torch.tensor([0.5, 0.3], dtype=torch.float64)
        self.pi = torch.tensor([0.3, 0.7], dtype=torch.float64)

    def moments(self):
        """Exact mean [2] and standard deviation [2] of the mixture."""
        mean = (self.pi[:, None] * self.mu).sum(0)
        second = (self.pi[:, None] * (self.s[:, None] ** 2 + self.mu ** 2)).sum(0)
        return mean, (second - mean ** 2).sqrt()

    def __call__(self, x, sigma, y, skip_cache=None, reuse_cache=False):
        var = self.s ** 2 + sigma ** 2  # [K]
        diff = x[:, None, :] - self.mu[None]  # [B, K, 2]
        log_w = self.pi.log() - diff.shape[-1] / 2 * var.log() - (diff ** 2).sum(-1) / (2 * var)
        own = torch.nn.functional.one_hot(y.clamp(max=1), 2).bool()
        log_w = torch.where((y[:, None] == self.num_classes) | own, log_w, -math.inf)
        w = log_w.softmax(-1)[..., None]
        return (w * (self.mu[None] + (self.s ** 2 / var)[None, :, None] * diff)).sum(1)


def test_heun_reproduces_gaussian_mixture_moments():
    """Tolerance: 0.03 on means and stds; the Monte-Carlo standard error with 20000 samples is ~0.01."""
    gm = GaussianMixture()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20000, 2, generator=g, dtype=torch.float64)
    y = torch.full((20000,), gm.num_classes)
    out = sample(gm, noise, y, karras_sigmas(32), sampler="heun")
    mean, std = gm.moments()
    torch.testing.assert_close(out.x.mean(0), mean, atol=0.03, rtol=0)
    torch.testing.assert_close(out.x.std(0), std, atol=0.03, rtol=0)
    assert out.full_steps == 2 * 32 - 1 and out.cached_steps == 0 and out.blocks_run is None
    share = (out.x[:, 0] < -0.25).double().mean()  # the two modes keep their weights
    assert float(share) == pytest.approx(0.3, abs=0.02)


def test_ddpm_and_euler_sample_the_mixture_too():
    gm = GaussianMixture()
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(8000, 2, generator=g, dtype=torch.float64)
    y = torch.full((8000,), gm.num_classes)
    mean, std = gm.moments()
    sched = DDPMSchedule("linear")
    for sampler, sigmas in (("ddpm", ddpm_sigmas(sched, 250)), ("euler", karras_sigmas(100))):
        out = sample(gm, noise, y, sigmas, sampler=sampler, generator=g)
        torch.testing.assert_close(out.x.mean(0), mean, atol=0.06, rtol=0)
        torch.testing.assert_close(out.x.std(0), std, atol=0.06, rtol=0)


def test_guidance_scale_one_equals_conditional_model():
    gm = GaussianMixture()
    noise = torch.randn(500, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.arange(500) % 2
    sigmas = karras_sigmas(10)
    guided = sample(gm, noise, y, sigmas, guidance_scale=1.0).x
    plain = heun_sampler(lambda x, s: gm(x, s, y), noise * sigmas[0], sigmas)
    assert torch.equal(guided, plain)
    # conditional samples land on their own component
    torch.testing.assert_close(guided[y == 0].mean(0), gm.mu[0], atol=0.1, rtol=0)


def _skip_dit(seed=0):
    """A tiny skip-branch DiT with its zero-initialised layers randomised (else every block is the
    identity and the output 0, which would make cached and uncached sampling trivially equal)."""
    torch.manual_seed(seed)
    net = build_model("DiT-S/2", skip=True, **TINY).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return Denoiser(net, make_preconditioning("edm"))


class CountingDenoiser:
    """Wraps a denoiser, recording the batch size of every call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.num_classes = inner.num_classes

    def new_skip_cache(self, n_keep):
        return self.inner.new_skip_cache(n_keep)

    def __call__(self, x, sigma, y, **kw):
        self.calls.append(x.shape[0])
        return self.inner(x, sigma, y, **kw)


@torch.no_grad()
def test_guided_step_is_one_batched_forward():
    den = CountingDenoiser(_skip_dit())
    x = torch.randn(3, 4, 8, 8)
    y = torch.tensor([1, 2, 3])
    model = GuidedModel(den, y, guidance_scale=4.0)
    out = model(x, 1.5)
    assert den.calls == [6]
    cond, uncond = den.inner(x, 1.5, y), den.inner(x, 1.5, torch.full_like(y, 10))
    torch.testing.assert_close(out, uncond + 4.0 * (cond - uncond), rtol=1e-5, atol=1e-5)
    # outside the guidance interval the step is conditional only, one forward of batch B
    model = GuidedModel(den, y, guidance_scale=4.0, guidance_interval=(2.0, 10.0))
    torch.testing.assert_close(model(x, 1.5), cond)
    assert den.calls[-1] == 3


def test_skip_cache_interval_one_equals_uncached():
    den = _skip_dit()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 7])
    sigmas = karras_sigmas(6)
    plain = sample(den, noise, y, sigmas, guidance_scale=3.0)
    one = sample(den, noise, y, sigmas, guidance_scale=3.0, skip_cache=SkipCacheConfig(interval=1, n_keep=1))
    assert torch.equal(plain.x, one.x)
    assert one.full_steps == plain.full_steps == 11 and one.cached_steps == 0
    two = sample(den, noise, y, sigmas, guidance_scale=3.0, skip_cache=SkipCacheConfig(interval=2, n_keep=1))
    assert not torch.equal(plain.x, two.x)  # the test can tell cached from uncached


@pytest.mark.parametrize(
    "sampler, steps, interval, n_keep, forced, expect",
    [
        ("euler", 10, 3, 1, 0, "FCCFCCFCCF"),
        ("heun", 5, 2, 2, 0, "FCFCFCFCF"),  # 2 evaluations per Heun step, 1 in the last
        ("ddpm", 6, 3, 1, 3, "FFFCCF"),  # the 3 highest sigmas are forced full
    ],
)
def test_executed_blocks_match_schedule(sampler, steps, interval, n_keep, forced, expect):
    den = _skip_dit()
    depth = den.net.depth
    sigmas = karras_sigmas(steps) if sampler != "ddpm" else ddpm_sigmas(DDPMSchedule(), steps)
    force = (float(sigmas[forced - 1]), float(sigmas[0])) if forced else None
    cfg = SkipCacheConfig(interval, n_keep, force)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    out = sample(den, noise, torch.tensor([1, 2]), sigmas, sampler=sampler, skip_cache=cfg,
                 generator=torch.Generator().manual_seed(5))
    full, cached = expect.count("F"), expect.count("C")
    assert (out.full_steps, out.cached_steps) == (full, cached)
    assert out.blocks_run == full * depth + cached * 2 * n_keep


def test_guidance_interval_change_forces_a_full_step():
    """Entering the unguided range halves the batch; the cached state no longer fits, so refresh."""
    den = _skip_dit()
    sigmas = karras_sigmas(6)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    out = sample(den, noise, torch.tensor([1, 2]), sigmas, sampler="euler", guidance_scale=2.0,
                 guidance_interval=(float(sigmas[3]), math.inf), skip_cache=SkipCacheConfig(interval=10))
    assert (out.full_steps, out.cached_steps) == (2, 4)  # F C C | F C C
    assert torch.isfinite(out.x).all()


def test_ancestral_step_is_the_ddpm_posterior():
    """One sigma-form ancestral step equals x_{t-1} = mu(x_t, x0) + sqrt(beta_tilde) z of Ho et al."""
    sched = DDPMSchedule("linear")
    t, t_prev = 600, 596  # a respaced pair: the posterior uses beta = 1 - ab_t / ab_prev
    ab, ab_prev = float(sched.alphabar[t]), float(sched.alphabar[t_prev])
    beta = 1 - ab / ab_prev
    g = torch.Generator().manual_seed(7)
    x0_hat = torch.randn(4, 5, generator=g, dtype=torch.float64)
    x_t = torch.randn(4, 5, generator=g, dtype=torch.float64)
    sig = torch.stack([sched.sigmas[t], sched.sigmas[t_prev]])
    out = ddpm_ancestral_sampler(lambda x, s: x0_hat, x_t / math.sqrt(ab), sig,
                                 generator=torch.Generator().manual_seed(8))
    z = torch.randn(4, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    mu = (math.sqrt(ab_prev) * beta / (1 - ab)) * x0_hat + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)) * x_t
    var = (1 - ab_prev) / (1 - ab) * beta
    torch.testing.assert_close(out * math.sqrt(ab_prev), mu + math.sqrt(var) * z)


def test_euler_step_is_ddim():
    """x_{t-1} = sqrt(ab') x0 + sqrt(1 - ab') eps_hat with eps_hat = (x_t - sqrt(ab) x0) / sqrt(1 - ab)."""
    sched = DDPMSchedule("cosine")
    ab, ab_prev = float(sched.alphabar[800]), float(sched.alphabar[700])
    g = torch.Generator().manual_seed(9)
    x0_hat = torch.randn(3, 4, generator=g, dtype=torch.float64)
    x_t = torch.randn(3, 4, generator=g, dtype=torch.float64)
    sig = torch.stack([sched.sigmas[800], sched.sigmas[700]])
    out = euler_sampler(lambda x, s: x0_hat, x_t / math.sqrt(ab), sig)
    eps_hat = (x_t - math.sqrt(ab) * x0_hat) / math.sqrt(1 - ab)
    torch.testing.assert_close(out * math.sqrt(ab_prev), math.sqrt(ab_prev) * x0_hat + math.sqrt(1 - ab_prev) * eps_hat)


def test_sigma_grids():
    grid = karras_sigmas(50)
    assert len(grid) == 51 and grid[-1] == 0
    assert float(grid[0]) == pytest.approx(80.0) and float(grid[-2]) == pytest.approx(0.002)
    assert (grid[1:] < grid[:-1]).all()
    sched = DDPMSchedule("linear")
    grid = ddpm_sigmas(sched, 250)
    assert len(grid) == 251 and grid[0] == sched.sigmas[999] and grid[-2] == sched.sigmas[0]
    assert math.isfinite(float(ddpm_sigmas(DDPMSchedule(zero_terminal_snr=True), 10)[0]))
    assert torch.equal(default_sigmas("heun", 18), karras_sigmas(18))
    assert torch.equal(default_sigmas("ddim", 50), ddpm_sigmas(sched, 50))


@pytest.mark.parametrize(
    "call, culprit",
    [
        (lambda gm, n, y: sample(gm, n, y, karras_sigmas(3), sampler="dpm++"), "dpm\\+\\+"),
        (lambda gm, n, y: sample(gm, n, y, torch.tensor([1.0, 2.0, 0.0])), "sigmas"),
        (lambda gm, n, y: SkipCacheConfig(interval=0), "interval"),
        (lambda gm, n, y: SkipCacheConfig(n_keep=0), "n_keep"),
        (lambda gm, n, y: GuidedModel(gm, y, guidance_interval=(2.0, 1.0)), "guidance_interval"),
        (lambda gm, n, y: karras_sigmas(0), "steps"),
        (lambda gm, n, y: default_sigmas("lms", 10), "lms"),
        (lambda gm, n, y: ddpm_sigmas(DDPMSchedule(), 1001), "steps"),
    ],
)
def test_bad_input_names_the_culprit(call, culprit):
    gm = GaussianMixture()
    with pytest.raises(ValueError, match=culprit) as err:
        call(gm, torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.long))
    assert "\n" not in str(err.value)
