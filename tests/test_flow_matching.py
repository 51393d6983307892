"""Flow matching as a preconditioning in the sigma formulation (trainer.diffusion 'flow'): closed
forms at chosen t, the Euler step against the interpolant's ODE step, the t-space Heun sampler, the
SiT release fixture through it, and masked training / Skip-Cache sampling with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model_zoo.registry import build_model
from trainer.diffusion import (
    Denoiser,
    FlowPrecond,
    LossWeighting,
    SkipCacheConfig,
    default_sigmas,
    flow_sigmas,
    sample,
    training_losses,
)
from trainer.diffusion.noise import make_sigma_sampler
from trainer.diffusion.samplers import SAMPLERS, euler_sampler, heun_sampler, heun_t_sampler
from trainer.sample.loading import load_model

FIXTURES = Path(__file__).parent / "fixtures" / "reference_checkpoints"
TS = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)


def test_scalings_target_and_weights_are_the_closed_forms():
    pre = FlowPrecond()
    sigma = TS / (1 - TS)
    c_skip, c_out, c_in, c_noise = pre.scalings(sigma)
    for got, want in ((c_skip, 1 - TS), (c_out, TS), (c_in, 1 - TS), (c_noise, 1 - TS)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=g,
                                                                                   dtype=torch.float64)
    target = pre.target(x0, n, sigma)
    torch.testing.assert_close(target, x0 - n)  # SiT's velocity x_data - noise
    x = x0 + sigma.view(-1, 1, 1, 1) * n
    xt = (1 - TS).view(-1, 1, 1, 1) * x0 + TS.view(-1, 1, 1, 1) * n
    torch.testing.assert_close(c_in.view(-1, 1, 1, 1) * x, xt)  # the network sees the interpolant
    denoised = c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * target
    torch.testing.assert_close(denoised, x0)
    snr = ((1 - TS) / TS) ** 2
    min_snr = LossWeighting("min_snr", gamma=5.0)
    torch.testing.assert_close(min_snr.x0_weight(sigma, pre).double(), snr.clamp(max=5.0), rtol=1e-6, atol=0)
    torch.testing.assert_close(min_snr.output_weight(sigma, pre).double(), snr.clamp(max=5.0) * TS ** 2, rtol=1e-6,
                               atol=0)
    assert LossWeighting("constant").output_weight(sigma, pre).eq(1).all()
    ends = torch.tensor([0.0, float("inf"), 1e8])  # t = 0 and t -> 1
    assert all(torch.isfinite(v).all() for v in pre.scalings(ends.clamp(max=1e8)))
    for name in ("constant", "min_snr", "snr"):
        assert torch.isfinite(LossWeighting(name).output_weight(ends, pre)).all(), name


def test_flow_time_samplers_draw_t_in_0_1():
    for name in ("flow_uniform", "flow_logit_normal"):
        sigma = make_sigma_sampler(name)(20000, generator=torch.Generator().manual_seed(1))
        t = sigma / (1 + sigma)
        assert torch.isfinite(sigma).all() and (t >= 0).all() and (t < 1).all()
        assert abs(float(t.mean()) - 0.5) < 0.01, name  # both symmetric about 1/2
    sigma = make_sigma_sampler("flow_logit_normal")(20000, generator=torch.Generator().manual_seed(1))
    assert abs(float(sigma.log().std()) - 1.0) < 0.03  # logit(t) = ln(sigma) for sigma = t / (1 - t)


def _d(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A denoiser that is not linear in x (so that Heun variants can differ)."""
    return torch.tanh(x / (1 + sigma)) * 0.7


def test_an_euler_step_in_sigma_is_the_interpolants_ode_step_and_heun_differs():
    g = torch.Generator().manual_seed(2)
    xt = torch.randn(4, 3, generator=g, dtype=torch.float64)
    t, t_next = 0.8, 0.55
    s, s_next = t / (1 - t), t_next / (1 - t_next)
    # the ODE in t: d x_t / dt = v = (x_t - x0_hat) / t, one Euler step
    v = (xt - _d(xt / (1 - t), s)) / t
    want = xt + (t_next - t) * v
    sigmas = torch.tensor([s, s_next], dtype=torch.float64)
    got = euler_sampler(_d, xt / (1 - t), sigmas) * (1 - t_next)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # Heun: the t-space step is not the sigma-space step (derivation in docs/diffusion.md)
    in_t = heun_t_sampler(_d, xt / (1 - t), sigmas) * (1 - t_next)
    in_sigma = heun_sampler(_d, xt / (1 - t), sigmas) * (1 - t_next)
    x_e = xt + (t_next - t) * v
    v2 = (x_e - _d(x_e / (1 - t_next), s_next)) / t_next
    torch.testing.assert_close(in_t, xt + (t_next - t) * 0.5 * (v + v2), rtol=1e-12, atol=1e-12)
    assert (in_t - in_sigma).abs().max() > 1e-4


def test_flow_grid_is_even_in_t():
    sigmas = flow_sigmas(4, t_max=0.8)
    t = sigmas / (1 + sigmas)
    torch.testing.assert_close(t, torch.tensor([0.8, 0.6, 0.4, 0.2, 0.0], dtype=torch.float64))
    assert torch.equal(default_sigmas("heun", 4, preconditioning="flow"), flow_sigmas(4))


def test_sit_release_denoises_as_its_velocity_says():
    """SiT's reference output is the velocity x_data - noise at its time t_sit (1 at the data);
    our flow denoiser must return x_t + (1 - t_sit) * out from the same network."""
    model = load_model(str(FIXTURES / "sit_tiny.pt"), num_heads=2)
    assert model.kind == "sit-release" and model.denoiser.precond.name == "flow"
    ref = {k: torch.from_numpy(v) for k, v in np.load(FIXTURES / "sit_tiny_io.npz").items()}
    t_sit = ref["t"].view(-1, 1, 1, 1)
    sigma = ((1 - ref["t"]) / ref["t"]).float()
    with torch.no_grad():
        got = model.denoiser(ref["x"] / t_sit, sigma, ref["y"])
    torch.testing.assert_close(got, ref["x"] + (1 - t_sit) * ref["out"], rtol=0, atol=1e-5)


def test_masked_training_and_skip_cache_sampling_work_with_flow():
    torch.manual_seed(0)
    net = build_model("MaskDiT-S/2", input_size=8, in_channels=3, num_classes=10, hidden_size=32, depth=4,
                      num_heads=2, decoder_depth=1, decoder_hidden_size=16, decoder_num_heads=2, skip=True)
    den = Denoiser(net, FlowPrecond())
    x0 = torch.randn(8, 3, 8, 8)
    y = torch.randint(0, 10, (8,))
    out = training_losses(den, x0, y, 0.5, LossWeighting("min_snr"), make_sigma_sampler("flow_logit_normal"),
                          lambda_mae=0.1)
    assert torch.isfinite(out.loss).all() and out.mae.gt(0).all()  # masked: MAE on the dropped tokens
    out.loss.mean().backward()
    assert net.final_layer.linear.weight.grad.abs().sum() > 0  # (adaLN-Zero: the rest starts at zero)
    with torch.no_grad():  # random weights everywhere: at its zero init the network ignores its blocks
        for p in net.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    net.eval()
    noise = torch.randn(4, 3, 8, 8)
    sigmas = default_sigmas("heun_t", 6, preconditioning="flow")
    with torch.no_grad():
        full = sample(den, noise, y[:4], sigmas, "heun_t").x
        cached = sample(den, noise, y[:4], sigmas, "heun_t", skip_cache=SkipCacheConfig(2))
    assert torch.isfinite(full).all() and cached.cached_steps > 0
    with torch.no_grad():  # 'heun' on a flow model is Heun in flow time
        assert torch.equal(sample(den, noise, y[:4], sigmas, "heun").x, full)
    assert not torch.equal(cached.x, full) and (cached.x - full).abs().mean() < full.abs().mean()


@pytest.mark.parametrize("sampler", ["heun", "euler", "heun_t"])
def test_samplers_on_the_flow_grid_land_on_the_data_for_a_perfect_denoiser(sampler):
    """With D = the true x0 of a single point, every sampler must end exactly there."""
    x0 = torch.full((1, 2), 0.3, dtype=torch.float64)
    sigmas = default_sigmas(sampler, 8, preconditioning="flow")
    start = torch.randn(1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * sigmas[0]
    out = SAMPLERS[sampler].run(lambda x, s: x0.expand_as(x), start, sigmas)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-9)
