"""The MaskDiT objective (trainer/diffusion/objective.py): DSM on kept tokens + lambda_MAE x MAE on masked ones."""

import math

import pytest
import torch
from torch import nn

from model_zoo.layers import ModelOutput, patchify
from model_zoo.registry import build_model
from trainer.diffusion import (
    DDPMSchedule,
    Denoiser,
    DiscreteSigma,
    LogNormalSigma,
    LossWeighting,
    make_preconditioning,
    maskdit_loss,
    normalize_patches,
    training_losses,
)

TINY = dict(input_size=8, in_channels=4, num_classes=10, hidden_size=32, depth=4, num_heads=2)


class ScriptedNet(nn.Module):
    """Follows the model_zoo contract; returns whatever `respond(x_in, t)` gives, and a fixed mask."""

    def __init__(self, respond, mask=None, patch_size=2, num_classes=10):
        super().__init__()
        self.respond, self.mask, self.patch_size, self.num_classes = respond, mask, patch_size, num_classes

    def forward(self, x, t, y, mask_ratio=0.0, skip_cache=None, reuse_cache=False):
        return ModelOutput(self.respond(x, t), self.mask if mask_ratio > 0 else None)


def _batch(seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 4, 8, 8, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    return x0, noise, torch.arange(b)


def _half_mask(b=3, n=16):
    """Mask of the odd tokens for sample 0, the even ones for the others (1 = masked)."""
    mask = torch.zeros(b, n)
    mask[0, 1::2] = 1
    mask[1:, 0::2] = 1
    return mask


@pytest.mark.parametrize("precond", ["edm", "vp_eps", "vp_v", "vp_x0"])
def test_perfect_denoiser_has_zero_loss(precond):
    x0, noise, y = _batch()
    p = make_preconditioning(precond)
    sigma = torch.tensor([0.05, 1.0, 30.0])
    net = ScriptedNet(lambda x, t: p.target(x0, noise, sigma), mask=_half_mask())
    out = maskdit_loss(Denoiser(net, p), x0, y, sigma, noise, 0.0, LossWeighting("min_snr"))
    torch.testing.assert_close(out.loss, torch.zeros(3), atol=1e-10, rtol=0)
    masked = maskdit_loss(Denoiser(net, p), x0, y, sigma, noise, 0.5, LossWeighting("edm"))
    torch.testing.assert_close(masked.dsm, torch.zeros(3), atol=1e-10, rtol=0)
    assert (masked.mae > 0).all()  # the oracle is no MAE reconstruction


def test_dsm_counts_kept_tokens_only():
    x0, noise, y = _batch()
    p = make_preconditioning("edm")
    sigma = torch.tensor([0.5, 0.5, 2.0])
    mask = _half_mask()
    err_masked = 3.0 * mask.view(3, 1, 4, 4).repeat_interleave(2, 2).repeat_interleave(2, 3)  # token -> pixels

    def respond(x, t, err):
        return p.target(x0, noise, sigma) + err

    weighting = LossWeighting("constant")  # unit weight on F: the DSM is the plain MSE of F
    only_masked_wrong = ScriptedNet(lambda x, t: respond(x, t, err_masked), mask=mask)
    out = maskdit_loss(Denoiser(only_masked_wrong, p), x0, y, sigma, noise, 0.5, weighting)
    torch.testing.assert_close(out.dsm, torch.zeros(3), atol=1e-10, rtol=0)
    only_kept_wrong = ScriptedNet(lambda x, t: respond(x, t, 3.0 - err_masked), mask=mask)
    out = maskdit_loss(Denoiser(only_kept_wrong, p), x0, y, sigma, noise, 0.5, weighting, lambda_mae=0.0)
    torch.testing.assert_close(out.dsm, torch.full((3,), 9.0))  # mean over kept tokens, not all
    torch.testing.assert_close(out.loss, out.dsm)


def test_mae_target_is_the_noisy_input_normalised_per_patch():
    """A net that outputs its own (scaled) noisy input, normalised per patch, has zero MAE."""
    x0, noise, y = _batch()

    def respond(x_in, t):
        tokens = normalize_patches(patchify(x_in, 2))
        return tokens.view(3, 4, 4, 2, 2, 4).permute(0, 5, 1, 3, 2, 4).reshape(3, 4, 8, 8)

    # check the inverse reshape above really inverts patchify before relying on it
    z = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(patchify(z, 2).view(3, 4, 4, 2, 2, 4).permute(0, 5, 1, 3, 2, 4).reshape(3, 4, 8, 8), z)
    net = ScriptedNet(respond, mask=_half_mask())
    sigma = torch.tensor([0.1, 1.0, 10.0])
    out = maskdit_loss(Denoiser(net, make_preconditioning("edm")), x0, y, sigma, noise, 0.5, LossWeighting())
    torch.testing.assert_close(out.mae, torch.zeros(3), atol=1e-4, rtol=0)
    assert (out.dsm > 0).all()
    torch.testing.assert_close(out.loss, out.dsm + 0.1 * out.mae)


def test_real_maskdit_mask_ratio_zero_has_no_mae_and_gradients_flow():
    torch.manual_seed(0)
    net = build_model("MaskDiT-S/2", decoder_hidden_size=32, decoder_num_heads=2, decoder_depth=1, **TINY)
    den = Denoiser(net, make_preconditioning("edm"))
    x0, noise, y = _batch(b=4)
    g = torch.Generator().manual_seed(5)
    out = training_losses(den, x0, y, 0.0, LossWeighting("min_snr"), LogNormalSigma(), generator=g)
    assert out.loss.shape == out.sigma.shape == out.dsm.shape == out.mae.shape == (4,)
    assert (out.mae == 0).all() and torch.equal(out.loss, out.dsm)
    out = training_losses(den, x0, y, 0.5, LossWeighting("min_snr"), LogNormalSigma(), generator=g)
    assert (out.mae > 0).all() and torch.isfinite(out.loss).all()
    out.loss.mean().backward()
    grads = [q.grad for q in net.parameters() if q.requires_grad]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)


def test_constant_weighting_is_dit_epsilon_mse():
    """vp_eps + 'constant' + uniform DDPM timesteps is DiT's plain epsilon-MSE, sample by sample."""
    torch.manual_seed(0)
    net = build_model("DiT-S/2", learn_sigma=True, **TINY)
    with torch.no_grad():  # a non-zero output layer, so the prediction is not trivially 0
        net.final_layer.linear.weight.normal_(std=0.1)
    sched = DDPMSchedule("linear")
    den = Denoiser(net, make_preconditioning("vp_eps", schedule=sched))
    x0, _, y = _batch(b=4)
    out = training_losses(den, x0, y, 0.0, LossWeighting("constant"), DiscreteSigma(sched),
                          generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # replay the draws: t first, then the noise
    t = torch.randint(0, 1000, (4,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    ab = sched.alphabar[t].float().view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    eps_hat = net(x_t, t.float(), y).sample[:, :4]
    torch.testing.assert_close(out.loss, ((eps_hat - eps) ** 2).mean((1, 2, 3)), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.sigma, sched.t_to_sigma(t))


def test_zero_snr_sigma_gives_finite_loss():
    x0, noise, y = _batch()
    p = make_preconditioning("vp_v", schedule=DDPMSchedule(zero_terminal_snr=True))
    net = ScriptedNet(lambda x, t: torch.zeros_like(x), mask=_half_mask())
    sigma = torch.tensor([math.inf, 1.0, 0.0])
    out = maskdit_loss(Denoiser(net, p), x0, y, sigma, noise, 0.5, LossWeighting("min_snr"))
    assert torch.isfinite(out.loss).all()


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_bad_mask_ratio_is_rejected(ratio):
    x0, noise, y = _batch()
    den = Denoiser(ScriptedNet(lambda x, t: x), make_preconditioning("edm"))
    with pytest.raises(ValueError, match="mask_ratio"):
        maskdit_loss(den, x0, y, torch.ones(3), noise, ratio, LossWeighting())


def test_maskless_network_with_mask_ratio_is_rejected():
    x0, noise, y = _batch()
    den = Denoiser(ScriptedNet(lambda x, t: x, mask=None), make_preconditioning("edm"))
    with pytest.raises(ValueError, match="no mask"):
        maskdit_loss(den, x0, y, torch.ones(3), noise, 0.5, LossWeighting())
    with pytest.raises(ValueError, match="lambda_mae"):
        maskdit_loss(den, x0, y, torch.ones(3), noise, 0.0, LossWeighting(), lambda_mae=-1.0)


@pytest.mark.parametrize("sampler,kind", [("ddpm_cosine", "cosine"), ("ddpm_linear", "linear"),
                                          ("lognormal", "linear")])
def test_vp_preconditioning_uses_the_training_schedule(sampler, kind):
    from trainer.config import load_config
    from trainer.diffusion import default_sigmas
    from trainer.training.task import TrainingModule

    cfg = load_config(None, ["diffusion.preconditioning=vp_eps", f"diffusion.sigma_sampler={sampler}"])
    net = build_model("DiT-S/8", input_size=8, num_classes=3, hidden_size=32, depth=1, num_heads=2)
    module = TrainingModule(net, cfg)
    schedule = module.denoiser.precond.schedule
    assert schedule.kind == kind
    if sampler != "lognormal":
        assert module.sigma_sampler.schedule is schedule  # the timesteps the network sees at training
    from trainer.diffusion import SIGMA_CEIL

    grid = default_sigmas("ddpm", 10, schedule)  # what mdt-sample uses for the ddpm sampler
    assert float(grid[0]) == pytest.approx(min(float(schedule.sigmas[-1]), SIGMA_CEIL))
    linear_top = float(DDPMSchedule("linear").sigmas[-1])
    assert (float(grid[0]) == pytest.approx(linear_top)) == (kind == "linear")
