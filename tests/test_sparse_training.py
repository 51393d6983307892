"""Token-sparse networks in the trainer (issue #23): path-drop guidance and its counted cost, the
config's refusals, and SPRINT and TREAD runs on 2 ranks at ZeRO-2 with alignment (train, resume
with the uninterrupted run's losses, export without training-only parts, sample)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model_zoo.flops import sampling_flops
from model_zoo.registry import build_model
from trainer.checkpoints import COMPLETE, export_weights, write_export
from trainer.cli import sample_main
from trainer.config import ConfigError, config_from_dict, validate
from trainer.diffusion import GuidedModel, make_denoiser, sample
from trainer.diffusion.samplers import guide, karras_sigmas
from trainer.evaluation.history import read_metrics
from trainer.sample.cost import step_costs
from trainer.sample.generate import sample_checkpoint

from launcher import free_port, losses, run, runs_in, tiny_config, train_each_command, write_config

TINY = dict(input_size=8, in_channels=3, num_classes=10, hidden_size=32, depth=6, num_heads=2)


def _sprint(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_model("SPRINT-S/2", **{**TINY, "dense_in": 1, "dense_out": 1, **kw}).eval()
    with torch.no_grad():  # adaLN-Zero starts every block as the identity: give the blocks some effect
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


# ----------------------------------------------------------------------------- path-drop guidance


def test_path_drop_guidance_is_its_closed_form_from_two_forwards():
    """D = D_weak + s (D_cond - D_weak), D_weak from the null class with the sparse path dropped;
    the guided batch runs the middle blocks for the conditional half only."""
    den = make_denoiser(_sprint(), "edm")
    y = torch.tensor([1, 4, 7])
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        got = GuidedModel(den, y, 2.5, guidance="path_drop")(x, 1.3)
        cond = den(x, 1.3, y)
        weak = den(x, 1.3, torch.full_like(y, 10), path_drop=torch.ones(3, dtype=torch.bool))
        cfg = GuidedModel(den, y, 2.5)(x, 1.3)
    torch.testing.assert_close(got, guide(cond, weak, 2.5), rtol=0, atol=1e-6)
    assert not torch.allclose(got, cfg, atol=1e-4)  # a different weak branch than CFG's


def test_path_drop_guidance_needs_a_sprint_network():
    den = make_denoiser(build_model("TREAD-S/2", **TINY), "edm")
    with pytest.raises(ValueError, match="path-drop guidance needs a network with a droppable sparse path"):
        GuidedModel(den, torch.tensor([1]), 2.0, guidance="path_drop")


def test_the_counted_cost_of_an_image_follows_the_guidance():
    """Per image: every evaluation by kind. Path-drop's weak branch skips the middle blocks, so its
    guided step is cheaper than CFG's, whose weak branch is a whole forward."""
    costs = step_costs("SPRINT-S/2", {**TINY, "dense_in": 1, "dense_out": 1}, "path_drop")
    with torch.device("meta"):
        net = build_model("SPRINT-S/2", **TINY, dense_in=1, dense_out=1)
    assert costs.full == sampling_flops(net) and costs.weak_full == sampling_flops(net, path_drop=True)
    assert 0 < costs.weak_full < 0.5 * costs.full  # 4 of 6 blocks skipped
    den = make_denoiser(_sprint(), "edm")
    sigmas = karras_sigmas(5)
    with torch.no_grad():
        out = sample(den, torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), sigmas, guidance_scale=2.0,
                     guidance="path_drop")
    assert out.weak_full_steps == out.full_steps == 9  # Heun: 2 evaluations a step but the last
    per_image = costs.per_image(out.full_steps, out.cached_steps, out.weak_full_steps, out.weak_cached_steps)
    assert per_image == 9 * (costs.full + costs.weak_full)
    cfg = step_costs("SPRINT-S/2", {**TINY, "dense_in": 1, "dense_out": 1}, "cfg")
    assert cfg.per_image(9, 0, 9, 0) == 18 * costs.full > per_image


def test_mdt_sample_takes_path_drop_guidance_for_sprint_only(tmp_path, capsys):
    kwargs = {**TINY, "dense_in": 1, "dense_out": 1}
    dataset = {"latent_shape": [3, 8, 8], "num_classes": 10, "scaling_factor": 1.0,
               "encoder": {"kind": "pixels", "id": "pixels"}}
    for name, kw in (("SPRINT-S/2", kwargs), ("TREAD-S/2", TINY)):
        net = build_model(name, **kw)
        write_export(str(tmp_path / f"{name[:6]}.safetensors"), net.state_dict(), name, kw, {}, dataset, 1, "ema")
    assert sample_main([str(tmp_path / "TREAD-.safetensors"), "--out", str(tmp_path / "t"), "--per-class", "1",
                        "--guidance-scale", "2", "--guidance", "path-drop", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--guidance path-drop needs a network with a droppable sparse path" in err
    assert sample_main([str(tmp_path / "SPRINT.safetensors"), "--out", str(tmp_path / "s"), "--num-images", "4",
                        "--steps", "3", "--guidance-scale", "2", "--guidance", "path-drop", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "guidance 2 (path-drop)" in out and re.search(r"[\d.]+ network GFLOPs per image \(counted\)", out)


# ----------------------------------------------------------------------------- the config


@pytest.mark.parametrize("over,message", [
    ({"model": {"name": "SPRINT-S/2", "skip": True}},
     "model.skip: Skip-DiT long skips cannot cross the sparse blocks of SPRINT-S/2"),
    ({"model": {"name": "TREAD-S/2", "skip": True}}, "model.skip: Skip-DiT long skips cannot cross"),
    ({"model": {"name": "SPRINT-S/2", "skip": False, "options": {"depth": 4, "dense_in": 2, "dense_out": 2}}},
     "model.options: dense_in 2 and dense_out 2 must be >= 0 and leave at least one block of depth 4"),
    ({"model": {"name": "TREAD-S/2", "skip": False, "options": {"dense_in": 1}}},
     "model.options: unknown option 'dense_in' for model TREAD-S/2"),
    ({"model": {"name": "MaskDiT-S/2"}, "eval": {"guidance": "path_drop"}},
     "eval.guidance: path_drop needs a SPRINT model (a sparse path to drop); MaskDiT-S/2 is a maskdit model"),
    ({"eval": {"guidance": "both"}}, "eval.guidance: 'both' is not one of cfg, path_drop"),
])
def test_combinations_that_cannot_work_are_refused_in_one_line(over, message):
    cfg = config_from_dict({"data": {"shards": "x"}, **over})
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1)
    assert message in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- on 2 ranks

FAMILIES = {
    # SPRINT: 1 dense block in, 2 sparse at 75% dropped, 1 dense out; the aligned block is sparse
    "sprint": ({"name": "SPRINT-S/2", "skip": False,
                "options": {"hidden_size": 32, "depth": 4, "num_heads": 2, "dense_in": 1, "dense_out": 1}}, 0.75),
    # TREAD: half the tokens bypass blocks 1-2 of 4; the aligned block (2) is one they bypass
    "tread": ({"name": "TREAD-S/2", "skip": False,
               "options": {"hidden_size": 32, "depth": 4, "num_heads": 2, "route_start": 1, "route_end": 3}}, 0.5),
}


def test_sparse_families_train_and_resume_at_zero2_with_alignment_and_export_no_head(features8, tmp_path):
    """Each family: 12 steps with alignment on a sparse block and a final dense fine-tune (2 steps),
    then the same run resumed from its step-6 checkpoint in another run directory: the losses of
    steps 7-12 equal the uninterrupted run's. Then SPRINT at ZeRO-3 with in-loop path-drop
    guidance. Five runs, one launch."""
    configs = []
    for family, (model, ratio) in FAMILIES.items():
        common = dict(run={"total_steps": 12}, model=model, checkpoint={"every": 6},
                      phases={"mask_ratio": ratio, "final_unmask_steps": 2},
                      align={"lambda_align": 0.5, "head_hidden": 16, "block": 2},
                      monitor={"log_every": 1, "peak_tflops": 1.0, "sample_count": 4, "sample_steps": 4})
        full = tiny_config(features8, str(tmp_path / family / "full"), **common)
        again = tiny_config(features8, str(tmp_path / family / "again"), **common)
        again["checkpoint"]["resume"] = str(tmp_path / family / "full" / "t" / "checkpoints" / "step00000006")
        configs += [write_config(full, tmp_path / f"{family}-full.yaml"),
                    write_config(again, tmp_path / f"{family}-again.yaml")]
    # and SPRINT at ZeRO-3 (sharded EMA), evaluated in the loop with path-drop guidance
    zero3 = tiny_config(features8, str(tmp_path / "zero3"), run={"total_steps": 6}, model=FAMILIES["sprint"][0],
                        phases={"mask_ratio": 0.75}, deepspeed={"zero_stage": 3, "precision": "fp32"},
                        eval={"every": 6, "metrics": ["digits"], "num_images": 20, "guidance_scales": [1.0, 2.0],
                              "guidance": "path_drop", "steps": 4, "batch_size": 20})
    configs.append(write_config(zero3, tmp_path / "zero3.yaml"))
    proc = run(train_each_command(configs, free_port()), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    outputs = runs_in(proc.stdout)
    assert len(outputs) == 5
    evaluated = read_metrics(str(tmp_path / "zero3" / "t"))
    assert [r["step"] for r in evaluated] == [6] and {"digits_fd", "digits_fd@g2"} <= set(evaluated[0]["metrics"])
    for k, family in enumerate(FAMILIES):
        ref, resumed = losses(outputs[2 * k]), losses(outputs[2 * k + 1])
        assert sorted(ref) == list(range(1, 13)) and sorted(resumed) == list(range(7, 13)), family
        for step in range(7, 13):
            assert resumed[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-8), (family, step)
        assert "final_unmask r=0.00" in outputs[2 * k] and "masked r=" in outputs[2 * k]
        end = tmp_path / family / "full" / "t" / "checkpoints" / "step00000012-final_unmask"
        assert (end / COMPLETE).exists()
        exported = tmp_path / f"{family}.safetensors"
        export_weights(str(end), str(exported), "ema")
        weights = load_file(exported)
        assert not any("align" in key for key in weights)  # the head trains and resumes, never exports
        assert ("mask_token" in str(list(weights))) == (family == "sprint")  # SPRINT's own parts do export
        guidance = "path_drop" if family == "sprint" else "cfg"
        result = sample_checkpoint(str(exported), str(tmp_path / f"{family}-samples"), classes=[0, 1], per_class=2,
                                   steps=4, guidance_scale=1.5, guidance=guidance, png=False,
                                   device=torch.device("cpu"))
        assert np.load(result.npz)["arr_0"].shape == (4, 8, 8, 3) and result.gflops_per_image > 0


def test_the_runs_flops_count_is_the_networks_plus_the_head_on_the_tokens_the_aligned_block_saw():
    """TrainingFlops (the run's accounting and study budgets) against FlopCounterMode around one
    training step's forward and backward: SPRINT at ratio 0.75 aligned on a sparse block (the head
    sees the kept quarter of the tokens) and on a dense one (all tokens). On the meta device, as the
    run counts: attention in its plain form, 3x its forward (a fused CPU kernel's backward would add
    its recomputation)."""
    from torch.utils.flop_counter import FlopCounterMode

    from model_zoo.flops import flop_mapping
    from model_zoo.layers import attention_backend, kept_token_count
    from trainer.config import TrainingFlops
    from trainer.training.task import AlignHead

    options = {"hidden_size": 32, "depth": 6, "num_heads": 2, "dense_in": 1, "dense_out": 1}
    for block, seen in ((3, kept_token_count(16, 0.75)), (6, 16)):
        cfg = config_from_dict({"model": {"name": "SPRINT-S/2", "skip": False, "options": options},
                                "align": {"lambda_align": 0.5, "head_hidden": 24, "block": block}})
        counted = TrainingFlops(cfg, (3, 8, 8), 10, feature_dim=12)
        assert counted.aligned_tokens(0.75) == seen
        with torch.device("meta"):
            net = build_model("SPRINT-S/2", input_size=8, in_channels=3, num_classes=10, **options)
            head = AlignHead(32, 24, 12)
            x, t, y = torch.randn(1, 3, 8, 8), torch.rand(1), torch.zeros(1, dtype=torch.long)
        counter = FlopCounterMode(display=False, custom_mapping=flop_mapping())
        with counter, attention_backend("sdpa"):
            out = net(x, t, y, mask_ratio=0.75, hidden_at=block)
            (out.sample.float().square().mean() + head(out.hidden).square().mean()).backward()
        assert counted(0.75) == counter.get_total_flops(), block
        assert counted(0.75) == counted.network(0.75) + seen * head.flops_per_token()
