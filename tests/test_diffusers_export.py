"""mdt-export --format diffusers: the DiT release fixture and our own DiTs as folders that diffusers
loads (DiTTransformer2DModel, its scheduler config, DiTPipeline), exact up to diffusers' timestep
embedding (checked with its frequency shift set to 0), and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel, EDMEulerScheduler

from data_tools.testing import make_tiny_vae
from model_zoo.registry import build_model
from trainer.checkpoints import write_export
from trainer.cli import export_main
from trainer.diffusion import karras_sigmas, sample
from trainer.sample.loading import load_model

FIXTURES = Path(__file__).parent / "fixtures" / "reference_checkpoints"


def unshifted(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """diffusers' DiT with the DiT release's timestep frequencies (exp(-ln(1e4) k / half))."""
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return model


def test_release_exports_exactly_and_stock_diffusers_differs(tmp_path, capsys):
    out = tmp_path / "dit"
    assert export_main([str(FIXTURES / "dit_tiny.pt"), "--format", "diffusers", "--out", str(out),
                        "--num-heads", "2"]) == 0, capsys.readouterr().err
    ref = {k: torch.from_numpy(v) for k, v in np.load(FIXTURES / "dit_tiny_io.npz").items()}
    model = DiTTransformer2DModel.from_pretrained(out).eval()
    with torch.no_grad():
        stock = model(ref["x"], timestep=ref["t"], class_labels=ref["y"]).sample
        exact = unshifted(model)(ref["x"], timestep=ref["t"], class_labels=ref["y"]).sample
    torch.testing.assert_close(exact, ref["out"], rtol=0, atol=1e-5)
    gap = float((stock - ref["out"]).norm() / ref["out"].norm())
    assert 0.005 < gap < 0.2, gap  # the hard-coded frequency shift: measured 0.03 here
    scheduler = DDIMScheduler.from_pretrained(out)
    assert (scheduler.config.beta_schedule, scheduler.config.prediction_type) == ("linear", "epsilon")
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.beta_end == 0.02


def _our_dit(path: Path, diffusion: dict) -> Path:
    kwargs = dict(input_size=8, in_channels=4, num_classes=10, hidden_size=32, depth=2, num_heads=2)
    net = build_model("DiT-S/2", **kwargs)
    g = torch.Generator().manual_seed(3)
    sd = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in net.state_dict().items()}
    write_export(str(path), sd, "DiT-S/2", kwargs, diffusion, {"latent_shape": [4, 8, 8], "num_classes": 10})
    return path


def test_dit_pipeline_generates_from_our_vp_export(tmp_path):
    src = _our_dit(tmp_path / "ours.safetensors", {"preconditioning": "vp_eps", "sigma_sampler": "ddpm_linear"})
    assert export_main([str(src), "--format", "diffusers", "--out", str(tmp_path / "d")]) == 0
    config = json.loads((tmp_path / "d" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "DDIMScheduler"
    pipe = DiTPipeline(transformer=DiTTransformer2DModel.from_pretrained(tmp_path / "d"),
                       vae=AutoencoderKL.from_pretrained(make_tiny_vae(str(tmp_path / "vae"))),
                       scheduler=DDIMScheduler.from_pretrained(tmp_path / "d"))
    # guidance_scale 1: DiTPipeline's null label is 1000, which a 10-class model does not have
    images = pipe(class_labels=[1, 7], num_inference_steps=4, guidance_scale=1.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    assert not np.allclose(images[0], images[1])


def test_an_edm_export_samples_our_images_with_the_edm_scheduler(tmp_path):
    """EDMEulerScheduler's Euler steps on the exported transformer (shift 0; started at noise x
    sigma_max, which DiTPipeline would not do) land on our own Euler sampler's result."""
    src = _our_dit(tmp_path / "ours.safetensors", {"preconditioning": "edm", "sigma_data": 0.5})
    assert export_main([str(src), "--format", "diffusers", "--out", str(tmp_path / "d")]) == 0
    model = unshifted(DiTTransformer2DModel.from_pretrained(tmp_path / "d").eval())
    scheduler = EDMEulerScheduler.from_pretrained(tmp_path / "d")
    steps = 6
    scheduler.set_timesteps(steps)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([2, 5])
    x = noise * scheduler.sigmas[0]
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = model(scheduler.scale_model_input(x, t), timestep=t.expand(2), class_labels=labels).sample
            x = scheduler.step(out[:, :4], t, x).prev_sample
        ours = sample(load_model(str(src)).denoiser, noise, labels, karras_sigmas(steps), "euler").x
    torch.testing.assert_close(x, ours, rtol=0, atol=1e-4)


def test_what_diffusers_cannot_hold_is_refused_in_one_line(tmp_path, capsys):
    code = export_main([str(FIXTURES / "maskdit_tiny.pt"), "--format", "diffusers", "--out", str(tmp_path / "m"),
                        "--num-heads", "2", "--decoder-num-heads", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "MaskDiT has no diffusers model class" in err[0], err
    kwargs = dict(input_size=8, in_channels=4, num_classes=10, hidden_size=32, depth=2, num_heads=2, skip=True)
    net = build_model("DiT-S/2", **kwargs)
    write_export(str(tmp_path / "skip.safetensors"), net.state_dict(), "DiT-S/2", kwargs, {},
                 {"latent_shape": [4, 8, 8]})
    assert export_main([str(tmp_path / "skip.safetensors"), "--format", "diffusers", "--out", str(tmp_path / "s")]) == 2
    assert "Skip-DiT model (model.skip) has no diffusers model class" in capsys.readouterr().err
