"""Schedules, preconditionings, sigma sampling and loss weights (trainer/diffusion/)."""

import math

import numpy as np
import pytest
import torch

from trainer.diffusion import (
    DDPMSchedule,
    Denoiser,
    DiscreteSigma,
    EDMPrecond,
    LogNormalSigma,
    LossWeighting,
    VPPrecond,
    make_preconditioning,
    make_sigma_sampler,
)

GAMMA = 5.0


def reference_linear_snr() -> np.ndarray:
    """Independent float64 derivation of the SNR of DDPM's linear schedule.

    beta_t = linspace(1e-4, 0.02, 1000); alphabar_t = prod_{s<=t} (1 - beta_s);
    x_t = sqrt(alphabar) x0 + sqrt(1 - alphabar) eps  =>  SNR_t = alphabar_t / (1 - alphabar_t).
    """
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    alphabar = np.cumprod(1.0 - betas)
    return alphabar / (1.0 - alphabar)


def reference_min_snr(snr: np.ndarray, prediction: str) -> np.ndarray:
    """Min-SNR-gamma in each output space, derived by hand.

    x0-space weight w = min(SNR, gamma). With x_t as above, the predictions relate to x0 by
      eps: x0 - x0_hat = sqrt((1-ab)/ab) (eps_hat - eps)  -> |.|^2 factor (1-ab)/ab = 1/SNR
      v:   x0 - x0_hat = sqrt(1-ab) (v_hat - v)           -> |.|^2 factor 1-ab = 1/(SNR+1)
      x0:  factor 1.
    so the output-space weights are min(SNR,g)/SNR, min(SNR,g)/(SNR+1) and min(SNR,g).
    """
    w = np.minimum(snr, GAMMA)
    return {"eps": w / snr, "v": w / (snr + 1.0), "x0": w}[prediction]


def test_linear_schedule_matches_reference():
    sched = DDPMSchedule("linear")
    snr_ref = reference_linear_snr()
    np.testing.assert_allclose(sched.sigmas.numpy(), 1.0 / np.sqrt(snr_ref), rtol=1e-12)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_min_snr_weights_on_linear_schedule(prediction):
    snr_ref = reference_linear_snr()
    t_cross = int(np.argmax(snr_ref < GAMMA))  # first step with SNR below gamma
    assert snr_ref[t_cross - 1] >= GAMMA > snr_ref[t_cross]
    points = np.array([0, 10, 100, t_cross - 1, t_cross, t_cross + 1, 500, 999])
    sched = DDPMSchedule("linear")
    precond = VPPrecond(prediction, sched)
    sigma = sched.t_to_sigma(torch.as_tensor(points))
    got = LossWeighting("min_snr", gamma=GAMMA).output_weight(sigma, precond).double().numpy()
    np.testing.assert_allclose(got, reference_min_snr(snr_ref[points], prediction), rtol=2e-5)
    if prediction == "eps":  # below gamma the eps weight is exactly 1, above it gamma / SNR < 1
        assert got[4] == pytest.approx(1.0) and got[3] < 1.0


def test_zero_snr_point_gives_finite_weights():
    sigma = torch.tensor([math.inf, 0.0])
    expect = {"eps": [1.0, 0.0], "v": [0.0, 0.0], "x0": [0.0, GAMMA]}  # limits SNR -> 0 and SNR -> inf
    for prediction, values in expect.items():
        w = LossWeighting("min_snr", gamma=GAMMA).output_weight(sigma, VPPrecond(prediction))
        assert torch.isfinite(w).all()
        torch.testing.assert_close(w, torch.tensor(values), atol=1e-6, rtol=0)
    for name in ("edm", "constant", "snr", "min_snr", "soft_min_snr"):
        for precond in ("edm", "vp_eps", "vp_v", "vp_x0"):
            p = make_preconditioning(precond)
            weighting = LossWeighting(name)
            assert torch.isfinite(weighting.output_weight(sigma, p)).all(), (name, precond)
            assert torch.isfinite(weighting.x0_weight(sigma, p)).all(), (name, precond)


def test_zero_terminal_snr_schedule():
    sched = DDPMSchedule("linear", zero_terminal_snr=True)
    assert math.isinf(sched.sigmas[-1]) and sched.alphabar[-1] == 0
    assert float(sched.alphabar[0]) == pytest.approx(float(DDPMSchedule("linear").alphabar[0]), rel=1e-12)
    sigma = DiscreteSigma(sched)(64, generator=torch.Generator().manual_seed(0))
    sigma = torch.cat([sigma, torch.tensor([math.inf])])
    w = LossWeighting("min_snr").output_weight(sigma, VPPrecond("v", sched))
    assert torch.isfinite(w).all()


def test_parameterisations_agree_in_x0_space():
    """w_out |F - F_target|^2 equals w_x0 |D - x0|^2, and w_x0 is the same for eps, v and x0."""
    g = torch.Generator().manual_seed(0)
    sched = DDPMSchedule("linear")
    sigma = sched.t_to_sigma(torch.tensor([5, 150, 400, 999]))
    x0 = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x = x0 + sigma.double().view(-1, 1, 1, 1) * noise
    weighting = LossWeighting("min_snr")
    x0_weights = []
    for prediction in ("eps", "v", "x0"):
        p = VPPrecond(prediction, sched)
        c_skip, c_out, _, _ = (c.double().view(-1, 1, 1, 1) for c in p.scalings(sigma.double()))
        f = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        denoised = c_skip * x + c_out * f
        f_target = p.target(x0, noise, sigma.double())
        lhs = weighting.output_weight(sigma, p).double() * ((f - f_target) ** 2).mean((1, 2, 3))
        rhs = weighting.x0_weight(sigma, p).double() * ((denoised - x0) ** 2).mean((1, 2, 3))
        torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=0)
        x0_weights.append(weighting.x0_weight(sigma, p))
    torch.testing.assert_close(x0_weights[0], x0_weights[1])
    torch.testing.assert_close(x0_weights[0], x0_weights[2])


@pytest.mark.parametrize("precond", ["edm", "vp_eps", "vp_v", "vp_x0"])
def test_oracle_output_gives_clean_sample(precond):
    """With F = F_target the denoiser D = c_skip x + c_out F returns x0 at every sigma."""
    p = make_preconditioning(precond)
    g = torch.Generator().manual_seed(1)
    sigma = torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0], dtype=torch.float64)
    x0 = torch.randn(5, 4, 2, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x = x0 + sigma.view(-1, 1, 1, 1) * noise
    c_skip, c_out, _, _ = (c.view(-1, 1, 1, 1) for c in p.scalings(sigma))
    torch.testing.assert_close(c_skip * x + c_out * p.target(x0, noise, sigma), x0, rtol=1e-9, atol=1e-9)


def test_edm_and_vp_scalings():
    sigma = torch.tensor([0.5, 2.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = EDMPrecond(0.5).scalings(sigma)
    torch.testing.assert_close(c_skip, 0.25 / (sigma ** 2 + 0.25))
    torch.testing.assert_close(c_out, sigma * 0.5 / (sigma ** 2 + 0.25).sqrt())
    torch.testing.assert_close(c_in, 1 / (sigma ** 2 + 0.25).sqrt())
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    # VP: c_in = sqrt(alphabar_t) and c_noise = t at the schedule's own sigmas.
    sched = DDPMSchedule("linear")
    t = torch.tensor([0, 1, 250, 998, 999])
    sigma = sched.sigmas[t]
    _, _, c_in, c_noise = VPPrecond("eps", sched).scalings(sigma)
    torch.testing.assert_close(c_in, sched.alphabar[t].sqrt())
    torch.testing.assert_close(c_noise, t.double(), atol=1e-3, rtol=0)
    mid = sched.sigma_to_t(((sched.sigmas[10] * sched.sigmas[11]).sqrt()).view(1))
    assert 10.0 < float(mid) < 11.0


def test_vp_scalings_match_textbook_inversions():
    """D from eps / v predictions equals the textbook x0 = (x_t - sqrt(1-ab) eps) / sqrt(ab), etc."""
    g = torch.Generator().manual_seed(2)
    sched = DDPMSchedule("cosine")
    t = torch.tensor([3, 400, 990])
    ab = sched.alphabar[t].view(-1, 1)
    sigma = sched.sigmas[t]
    x = torch.randn(3, 6, generator=g, dtype=torch.float64) * (1 + sigma.view(-1, 1))
    x_t = x * ab.sqrt()
    f = torch.randn(3, 6, generator=g, dtype=torch.float64)
    for prediction, textbook in (
        ("eps", (x_t - (1 - ab).sqrt() * f) / ab.sqrt()),
        ("v", ab.sqrt() * x_t - (1 - ab).sqrt() * f),
    ):
        c_skip, c_out, c_in, _ = (c.view(-1, 1) for c in VPPrecond(prediction, sched).scalings(sigma))
        torch.testing.assert_close(c_in * x, x_t)
        torch.testing.assert_close(c_skip * x + c_out * f, textbook)


def test_cosine_schedule_matches_formula():
    sched = DDPMSchedule("cosine")
    s, T = 0.008, 1000
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 300, 700):
        assert float(sched.alphabar[t]) == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert (sched.sigmas[1:] > sched.sigmas[:-1]).all()


def test_sigma_samplers():
    g = torch.Generator().manual_seed(3)
    sigma = LogNormalSigma()(20000, generator=g)
    assert sigma.shape == (20000,) and sigma.dtype == torch.float32
    assert float(sigma.log().mean()) == pytest.approx(-1.2, abs=0.04)
    assert float(sigma.log().std()) == pytest.approx(1.2, abs=0.04)
    sched = DDPMSchedule("linear")
    sigma = make_sigma_sampler("ddpm_linear", schedule=sched)(20000, generator=g)
    t = sched.sigma_to_t(sigma).round()
    torch.testing.assert_close(sched.t_to_sigma(t.long()), sigma)
    assert float(t.mean()) == pytest.approx(499.5, abs=10) and float(t.min()) < 10 and float(t.max()) > 990
    assert make_sigma_sampler("ddpm_cosine").schedule.kind == "cosine"


@pytest.mark.parametrize(
    "build, culprit",
    [
        (lambda: LossWeighting("min-snr"), "min-snr"),
        (lambda: LossWeighting("min_snr", gamma=0.0), "gamma"),
        (lambda: LossWeighting("min_snr", gamma=-1.0), "gamma"),
        (lambda: make_preconditioning("vp_epsilon"), "vp_epsilon"),
        (lambda: VPPrecond("score"), "score"),
        (lambda: EDMPrecond(0.0), "sigma_data"),
        (lambda: make_sigma_sampler("uniform"), "uniform"),
        (lambda: LogNormalSigma(p_std=0.0), "p_std"),
        (lambda: DDPMSchedule("quadratic"), "quadratic"),
        (lambda: DDPMSchedule("linear", beta_start=0.1, beta_end=0.01), "beta_start"),
    ],
)
def test_bad_input_names_the_culprit(build, culprit):
    with pytest.raises(ValueError, match=culprit) as err:
        build()
    assert "\n" not in str(err.value)


class _LinearNet(torch.nn.Module):
    """A contract-following stand-in: out = a * x + b * t (per sample), with learn_sigma channels."""

    patch_size, num_classes, in_channels = 1, 10, 2

    def forward(self, x, t, y, mask_ratio=0.0, skip_cache=None, reuse_cache=False):
        out = 0.5 * x + t.view(-1, 1, 1, 1)
        return type("Out", (), {"sample": torch.cat([out, out + 100.0], 1), "mask": None})()


def test_denoiser_applies_preconditioning():
    net, p = _LinearNet(), EDMPrecond()
    den = Denoiser(net, p)
    x = torch.randn(3, 2, 4, 4)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) for c in p.scalings(sigma))
    expect = c_skip * x + c_out * (0.5 * c_in * x + c_noise)  # the learned-sigma half is ignored
    torch.testing.assert_close(den(x, sigma, torch.zeros(3, dtype=torch.long)), expect)
    one = den(x, 1.0, torch.zeros(3, dtype=torch.long))  # a scalar sigma serves the whole batch
    torch.testing.assert_close(one, den(x, torch.ones(3), torch.zeros(3, dtype=torch.long)))
    assert den.num_classes == 10


def test_zero_terminal_snr_schedules_are_selectable_by_sigma_sampler_name():
    from trainer.config import ConfigError, config_from_dict
    from trainer.config.validation import validate
    from trainer.diffusion import ddpm_schedule_for, make_sigma_sampler

    for kind in ("linear", "cosine"):
        sched = ddpm_schedule_for(f"ddpm_{kind}_zsnr")
        assert sched.kind == kind and sched.zero_terminal_snr and sched.name == f"{kind}_zsnr"
        assert math.isinf(float(sched.sigmas[-1])) and not ddpm_schedule_for(f"ddpm_{kind}").zero_terminal_snr
        # the training sampler uses the one schedule it is given when the names agree
        assert make_sigma_sampler(f"ddpm_{kind}_zsnr", schedule=sched).schedule is sched
        assert make_sigma_sampler(f"ddpm_{kind}", schedule=sched).schedule is not sched
    cfg = config_from_dict({"data": {"shards": "x"}, "diffusion": {"preconditioning": "vp_v",
                                                                   "sigma_sampler": "ddpm_linear_zsnr"}})
    validate(cfg, 1)
    den = cfg.diffusion.denoiser(torch.nn.Identity())
    assert den.precond.schedule.zero_terminal_snr
    eps = config_from_dict({"data": {"shards": "x"}, "diffusion": {"preconditioning": "vp_eps",
                                                                   "sigma_sampler": "ddpm_cosine_zsnr"}})
    with pytest.raises(ConfigError, match="zero terminal SNR.*cannot train vp_eps"):
        validate(eps, 1)
