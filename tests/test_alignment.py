"""Representation alignment (REPA) in the objective and the trainer: the loss reaches kept tokens
only, the aligned state is the block's own output under every checkpointing mode, the head never
leaves training (EMA, exports, sampling), and a 2-rank ZeRO-2 run with it trains and resumes."""

import json
import math
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model_zoo.registry import build_model
from trainer.checkpoints import COMPLETE, export_weights
from trainer.config import ConfigError, config_from_dict, validate
from trainer.diffusion import LossWeighting, alignment_loss, make_denoiser, maskdit_loss
from trainer.diffusion.objective import Alignment
from trainer.sample.generate import sample_checkpoint
from trainer.training.task import AlignHead, TrainingModule, tokens_from_grid

from launcher import deepspeed_command, free_port, losses, run, seed_resume, tiny_config, write_config

TINY = dict(input_size=8, in_channels=3, hidden_size=32, depth=4, num_heads=2, num_classes=10,
            decoder_depth=1, decoder_hidden_size=16, decoder_num_heads=2, skip=True)


def _mask_dit(seed=0):
    torch.manual_seed(seed)
    net = build_model("MaskDiT-S/2", **TINY)
    for p in net.parameters():  # adaLN-Zero starts every block as the identity: perturb so all paths carry gradient
        p.data.add_(0.02 * torch.randn_like(p))
    return net


def test_the_alignment_loss_reaches_kept_tokens_only():
    net = _mask_dit()
    x = torch.randn(3, 3, 8, 8, requires_grad=True)
    features = torch.randn(3, 16, 24, requires_grad=True)  # [B, N tokens, D teacher]
    head = AlignHead(32, 20, 24)
    torch.manual_seed(1)
    out = net(x, torch.rand(3), torch.tensor([0, 1, 2]), mask_ratio=0.5, hidden_at=2)
    assert out.hidden.shape == (3, 8, 32) and out.keep_ids.shape == (3, 8)
    alignment_loss(head(out.hidden), features, out.keep_ids).sum().backward()
    kept = torch.zeros(3, 16, dtype=torch.bool)
    kept.scatter_(1, out.keep_ids, True)
    assert torch.equal(kept, out.mask == 0)
    per_token_feature_grad = features.grad.abs().sum(-1)
    assert (per_token_feature_grad[~kept] == 0).all() and (per_token_feature_grad[kept] > 0).all()
    # the input patches of masked tokens never reach the aligned block
    patch_grad = x.grad.abs().reshape(3, 3, 4, 2, 4, 2).sum((1, 3, 5)).reshape(3, 16)
    assert (patch_grad[~kept] == 0).all() and (patch_grad[kept] > 0).all()


def test_alignment_loss_is_the_mean_negative_cosine_similarity():
    a, b = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    expect = -(a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    torch.testing.assert_close(alignment_loss(a, b), expect.mean(1))
    assert torch.allclose(alignment_loss(3 * b, b), torch.full((2,), -1.0))
    ids = torch.tensor([[4, 0], [1, 2]])
    torch.testing.assert_close(alignment_loss(a[:, :2], b, ids),
                               alignment_loss(a[:, :2], torch.stack([b[0, [4, 0]], b[1, [1, 2]]])))
    with pytest.raises(ValueError, match="do not match the aligned tokens"):
        alignment_loss(a, torch.randn(2, 5, 6))


@pytest.mark.parametrize("mode", ["none", "torch", "deepspeed"])
def test_the_aligned_state_is_the_block_output_and_carries_gradients(mode):
    net = _mask_dit()
    seen = []
    net.blocks.blocks[1].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    net.set_checkpointing(mode)
    x = torch.randn(2, 3, 8, 8)
    out = net(x, torch.rand(2), torch.tensor([3, 4]), hidden_at=2)
    torch.testing.assert_close(out.hidden, seen[0])
    assert out.hidden.requires_grad and out.keep_ids is None  # r = 0: every token, no ids
    out.hidden.sum().backward()
    assert net.blocks.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.blocks.blocks[3].parameters())  # past block 2: untouched


def test_features_follow_the_token_grid():
    f = torch.arange(2 * 3 * 4 * 4, dtype=torch.float16).reshape(2, 3, 4, 4)
    tokens = tokens_from_grid(f, 4)
    assert tokens.dtype == torch.float32 and tokens.shape == (2, 16, 3)
    assert torch.equal(tokens[1, 4 * 2 + 3], f[1, :, 2, 3].float())  # row-major, as patchify
    pooled = tokens_from_grid(f, 2)
    torch.testing.assert_close(pooled[0, 0], f[0, :, :2, :2].float().mean((1, 2)))


def test_the_training_module_aligns_with_the_configured_block_and_weight():
    cfg = config_from_dict({"model": {"name": "MaskDiT-S/2", "options": {"depth": 4}},
                            "align": {"lambda_align": 0.5, "head_hidden": 20}})
    validate(cfg, 1)
    net = _mask_dit()
    module = TrainingModule(net, cfg, feature_shape=(24, 4))
    assert module.align_block == 2 and isinstance(module.align_head, AlignHead)  # ceil(4 / 3)
    assert module.align_head.flops_per_token() == 6 * (32 * 20 + 20 * 20 + 20 * 24)
    with pytest.raises(ValueError, match="pass the batch's teacher features"):
        module(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    torch.manual_seed(0)
    out = module(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), 0.5, torch.randn(2, 24, 4, 4))
    torch.testing.assert_close(out.loss, out.dsm + 0.1 * out.mae + 0.5 * out.align)
    assert ((out.align >= -1) & (out.align <= 1)).all()
    plain = TrainingModule(_mask_dit(), config_from_dict({"model": {"name": "MaskDiT-S/2"}}))
    assert plain.align_head is None
    assert torch.equal(plain(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), 0.5).align, torch.zeros(2))


def test_the_objective_adds_the_weighted_alignment_term():
    net = _mask_dit()
    den = make_denoiser(net, "edm")
    x0, y, noise = torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), torch.randn(2, 3, 8, 8)
    sigma = torch.tensor([0.5, 2.0])
    head = AlignHead(32, 8, 6)
    feats = torch.randn(2, 16, 6)
    torch.manual_seed(3)
    base = maskdit_loss(den, x0, y, sigma, noise, 0.5, LossWeighting("edm"))
    torch.manual_seed(3)
    aligned = maskdit_loss(den, x0, y, sigma, noise, 0.5, LossWeighting("edm"), align=Alignment(head, feats, 1, 2.0))
    torch.testing.assert_close(aligned.dsm, base.dsm)  # the same mask: the tap changes nothing else
    torch.testing.assert_close(aligned.loss, base.loss + 2.0 * aligned.align)


@pytest.mark.parametrize("bad,message", [
    ({"lambda_align": -1.0}, "align.lambda_align must be >= 0"),
    ({"lambda_align": 0.5, "block": 9}, "align.block 9 is deeper than MaskDiT-S/2's 4 encoder blocks"),
    ({"head_hidden": 0}, "align.head_hidden must be >= 1"),
])
def test_bad_alignment_settings_are_named(bad, message):
    cfg = config_from_dict({"model": {"name": "MaskDiT-S/2", "options": {"depth": 4}}, "align": bad})
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(cfg, 1)


ALIGN_LINE = re.compile(r"^step (\d+)/\d+ .* align (-?[\d.]+)\)", re.M)


def test_two_ranks_at_zero2_train_and_resume_with_alignment_and_export_no_head(features8, tmp_path):
    common = dict(run={"total_steps": 12}, checkpoint={"every": 6}, align={"lambda_align": 0.5, "head_hidden": 16},
                  monitor={"log_every": 1, "peak_tflops": 1.0, "sample_count": 4, "sample_steps": 4})
    full = write_config(tiny_config(features8, str(tmp_path / "full"), **common), tmp_path / "full.yaml")
    first = run(deepspeed_command(full, free_port()), tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    ref = losses(first.stdout)
    align = {int(s): float(v) for s, v in ALIGN_LINE.findall(first.stdout)}
    assert sorted(align) == list(range(1, 13)) and all(-1 <= v <= 1 and math.isfinite(v) for v in align.values())
    assert np.mean([align[s] for s in range(9, 13)]) < np.mean([align[s] for s in range(1, 5)]) - 0.05, align

    seed_resume(tmp_path / "full" / "t", tmp_path / "resumed" / "t", "step00000006")
    again_cfg = write_config(tiny_config(features8, str(tmp_path / "resumed"), **common), tmp_path / "again.yaml")
    again = run(deepspeed_command(again_cfg, free_port()), tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    resumed = losses(again.stdout)
    assert sorted(resumed) == list(range(7, 13))
    for step in range(7, 13):
        assert resumed[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-8), (step, resumed[step], ref[step])

    end = tmp_path / "full" / "t" / "checkpoints" / "step00000012"
    assert (end / COMPLETE).exists()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    trained = get_fp32_state_dict_from_zero_checkpoint(str(end.parent), tag=end.name)
    assert any(k.startswith("align_head.") for k in trained)  # the head is trained and saved for resuming ...
    assert not any("align" in k for k in load_file(end / "ema.safetensors"))  # ... but never averaged
    for which in ("ema", "model"):
        exported = tmp_path / f"{which}.safetensors"
        meta = export_weights(str(end), str(exported), which)
        assert not any("align" in k for k in load_file(exported)), which  # nor exported
        assert "align" not in json.loads(meta["model_kwargs"])
    result = sample_checkpoint(str(tmp_path / "ema.safetensors"), str(tmp_path / "samples"), classes=[0, 1],
                               per_class=2, steps=4, guidance_scale=1.5, png=False, device=torch.device("cpu"))
    assert np.load(result.npz)["arr_0"].shape == (4, 8, 8, 3)
