"""The published DiT, SiT and MaskDiT checkpoints through our readers (model_zoo.releases,
trainer.checkpoints.read_network, trainer.sample.load_model): numbers equal to the reference code's
on tests/fixtures/reference_checkpoints (made by running the public code, see its README), the
full-size key listings mapped tensor for tensor on the meta device, one-line refusals, and
mdt-convert -> mdt-sample."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_tools.testing import make_tiny_vae
from model_zoo.registry import build_model
from model_zoo.releases import ReleaseError, convert_release
from trainer.checkpoints import CheckpointError, read_network
from trainer.cli import convert_main, sample_main
from trainer.diffusion.samplers import GuidedModel, guide
from trainer.sample.loading import load_model

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "reference_checkpoints"
TOL = 1e-5


def io(name: str) -> dict:
    return {k: torch.from_numpy(v) for k, v in np.load(FIXTURES / f"{name}_io.npz").items()}


def test_dit_release_matches_the_reference_outputs_and_its_guidance():
    src = read_network(str(FIXTURES / "dit_tiny.pt"), num_heads=2)
    assert (src.kind, src.model_kwargs["num_classes"], src.model_kwargs["learn_sigma"]) == ("dit-release", 10, True)
    assert src.diffusion == {"preconditioning": "vp_eps", "sigma_sampler": "ddpm_linear"}
    net = build_model(src.model_name, **src.model_kwargs).eval()
    net.load_state_dict(src.state_dict)  # strict: every tensor of ours came from the file
    ref = io("dit_tiny")
    with torch.no_grad():
        out = net(ref["x"], ref["t"], ref["y"]).sample  # integer timesteps, the last label the null class
        assert out.shape == ref["out"].shape == (4, 8, 8, 8)
        torch.testing.assert_close(out, ref["out"], rtol=0, atol=TOL)
        both = net(ref["cfg_x"], ref["cfg_t"], ref["cfg_y"]).sample
    cond, uncond = both.chunk(2)
    scale = float(ref["cfg_scale"])
    half = len(cond)
    # the release guides 3 of the 4 latent channels; asked for, we do the same
    torch.testing.assert_close(guide(cond, uncond, scale, channels=3), ref["cfg_out"][:half], rtol=0, atol=TOL)
    # by default every channel is guided: the 4th channel differs from the release's
    ours = guide(cond, uncond, scale)
    assert (ours[:, 3] - ref["cfg_out"][:half, 3]).abs().max() > 1e-3
    torch.testing.assert_close(ours[:, :3], ref["cfg_out"][:half, :3], rtol=0, atol=TOL)


def test_guided_model_guides_only_the_channels_asked_for():
    class Stub:  # D = x (+1 for labels other than the null class): guidance moves only the guided channels
        num_classes = 10

        def __call__(self, x, sigma, y, skip_cache=None, reuse_cache=False):
            return x + (y != 10).float().view(-1, 1, 1, 1)

    x, y = torch.zeros(2, 4, 2, 2), torch.tensor([1, 2])
    out = GuidedModel(Stub(), y, 3.0, guidance_channels=3)(x, 1.0)
    assert out[:, :3].eq(3.0).all() and out[:, 3].eq(1.0).all()
    assert GuidedModel(Stub(), y, 3.0)(x, 1.0).eq(3.0).all()


def test_maskdit_release_matches_the_reference_denoiser():
    model = load_model(str(FIXTURES / "maskdit_tiny.pt"), num_heads=2, decoder_num_heads=2)
    assert model.kind == "maskdit-release" and model.model_kwargs["decoder_embed"] == "adaln"
    assert model.denoiser.precond.name == "edm" and model.denoiser.precond.sigma_data == 0.5
    ref = io("maskdit_tiny")
    null = torch.full_like(ref["y"], model.denoiser.num_classes)  # the release's all-zero one-hot label
    with torch.no_grad():
        torch.testing.assert_close(model.denoiser(ref["x"], ref["sigma"], ref["y"]), ref["denoised"], rtol=0, atol=TOL)
        torch.testing.assert_close(model.denoiser(ref["x"], ref["sigma"], null), ref["denoised_uncond"], rtol=0,
                                   atol=TOL)


def test_sit_release_network_matches_the_reference():
    src = read_network(str(FIXTURES / "sit_tiny.pt"), num_heads=2)  # the file name marks it as SiT's
    assert src.kind == "sit-release"
    net = build_model(src.model_name, **src.model_kwargs).eval()
    net.load_state_dict(src.state_dict)
    ref = io("sit_tiny")
    with torch.no_grad():
        out = net(ref["x"], ref["t"], ref["y"]).sample[:, :4]  # SiT returns the velocity channels only
    torch.testing.assert_close(out, ref["out"], rtol=0, atol=TOL)
    assert src.diffusion["preconditioning"] == "flow"  # its denoiser: tests/test_flow_matching.py


@pytest.mark.parametrize("listing,name", [("dit_xl2_256_keys.json", "DiT-XL/2"),
                                          ("maskdit_xl2_256_keys.json", "MaskDiT-XL/2")])
def test_full_size_releases_map_every_tensor_on_the_meta_device(listing, name):
    shapes = json.loads((FIXTURES / listing).read_text())
    flat = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    obj = {"ema": flat} if name.startswith("MaskDiT") else flat
    release = convert_release(obj)  # standard widths: the head counts need not be given
    assert release.model_name == name
    with torch.device("meta"):
        net = build_model(release.model_name, **release.model_kwargs)
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    converted = {k: tuple(v.shape) for k, v in release.state_dict.items()}
    assert converted == ours  # same names, same shapes, none left over on either side
    stored = {"pos_embed", "decoder_pos_embed"}  # fixed tables we rebuild: checked, not loaded
    expected = len(shapes) - len(stored & {k.removeprefix("model.") for k in shapes})
    assert len(converted) == expected
    assert release.model_kwargs["num_classes"] == 1000 and release.model_kwargs["input_size"] == 32


def test_files_that_are_no_release_get_one_line_naming_what_was_expected(tmp_path, capsys):
    bad = tmp_path / "weights.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, bad)
    with pytest.raises(CheckpointError, match=r"weights\.pt: not a DiT, SiT or MaskDiT release: expected the keys "
                                              r"x_embedder\.proj\.weight.*first keys found: encoder\.weight"):
        read_network(str(bad))
    code = convert_main([str(bad), "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("mdt-convert: error: "), err
    # a known layout with a tensor that fits nowhere is named too
    sd = torch.load(FIXTURES / "dit_tiny.pt", weights_only=True)
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ReleaseError, match=r"1 tensors of the dit release fit no tensor of ours, first: extra\.weight"):
        convert_release(sd, num_heads=2)
    with pytest.raises(ReleaseError, match="width 64 is not a standard one"):
        convert_release(torch.load(FIXTURES / "dit_tiny.pt", weights_only=True))
    pickled = tmp_path / "code.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)  # a pickled module: weights_only refuses to run it
    with pytest.raises(CheckpointError, match="cannot read .*code.pt as a tensors-only torch file"):
        read_network(str(pickled))


def test_a_training_checkpoint_with_its_args_loads(tmp_path):
    """The reference code's training checkpoints ({'model', 'ema', 'opt', 'args': Namespace}) load
    through weights_only with the Namespace allowed as data; the EMA is taken (live weights with
    weights='model')."""
    import argparse

    release = torch.load(FIXTURES / "maskdit_tiny.pt", weights_only=True)
    live = {k: v if "pos_embed" in k else v + 1.0 for k, v in release["ema"].items()}
    path = tmp_path / "0400000.pt"
    torch.save({"model": live, "ema": release["ema"], "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="DiT-XL/2", lr=1e-4)}, path)
    ema = read_network(str(path), num_heads=2, decoder_num_heads=2)
    model = read_network(str(path), weights="model", num_heads=2, decoder_num_heads=2)
    key = "blocks.blocks.0.attn.qkv.weight"
    assert torch.equal(ema.state_dict[key], release["ema"]["model.blocks.0.attn.qkv.weight"])
    assert torch.equal(model.state_dict[key], live["model.blocks.0.attn.qkv.weight"])


def test_converted_release_samples_like_the_release_itself(tmp_path, capsys):
    vae = make_tiny_vae(str(tmp_path / "vae"))
    out = tmp_path / "dit.safetensors"
    assert convert_main([str(FIXTURES / "dit_tiny.pt"), "--out", str(out), "--num-heads", "2"]) == 0
    assert "dit-release DiT-S/2" in capsys.readouterr().out
    args = ["--num-images", "4", "--sampler", "ddim", "--steps", "6", "--guidance-scale", "2", "--vae", vae,
            "--no-png", "--quiet"]
    assert sample_main([str(out), "--out", str(tmp_path / "a"), *args]) == 0, capsys.readouterr().err
    # the release file itself, read by the same loader, gives the same images
    assert sample_main([str(FIXTURES / "dit_tiny.pt"), "--num-heads", "2", "--out", str(tmp_path / "b"), *args]) == 0
    a = np.load(tmp_path / "a" / "samples.npz")["arr_0"]
    b = np.load(tmp_path / "b" / "samples.npz")["arr_0"]
    assert a.shape == (4, 16, 16, 3) and np.array_equal(a, b) and a.std() > 0
