"""Token-sparse networks (SPRINT, TREAD): the tokens the sparse blocks see, dense equivalence at
ratio 0, path drop, FLOPs, hidden_at, activation checkpointing, registry and refusals."""

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model_zoo.dit import DiT
from model_zoo.flops import flop_mapping, main, model_flops
from model_zoo.layers import AdaLNBlock, attention_backend, kept_token_count, random_token_mask, unpatchify
from model_zoo.registry import MODELS, build_model
from trainer.diffusion import Alignment, Denoiser, LossWeighting, make_preconditioning, maskdit_loss

TINY = dict(input_size=16, in_channels=4, num_classes=10, hidden_size=64, depth=6, num_heads=2)
# SPRINT's defaults leave blocks 2, 3 sparse; TREAD's default (route_end = depth - 3) only block 2,
# so the tests widen its route to three blocks.
LAYOUT = {"SPRINT-S/2": {}, "TREAD-S/2": dict(route_start=2, route_end=5)}
FAMILIES = list(LAYOUT)


def tiny(name: str, **kw) -> torch.nn.Module:
    return build_model(name, **{**TINY, **LAYOUT[name], **kw})


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Undo adaLN-Zero / zero final layer so that every path affects the output."""
    torch.manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs(batch: int = 3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    return x, torch.rand(batch, generator=g) * 2 - 1, torch.tensor([0, 5, 9, 2][:batch])


def block_tokens(model):
    """Record how many tokens each block is called with, in call order: (index, count)."""
    seen = []
    for i, block in enumerate(model.blocks.blocks):
        block.register_forward_pre_hook(lambda m, args, i=i: seen.append((i, args[0].shape[1])))
    return seen


@pytest.mark.parametrize("name", FAMILIES)
def test_sparse_blocks_see_exactly_the_kept_tokens(name):
    model = randomize(tiny(name)).eval()
    start, end, n = model.sparse_start, model.sparse_end, model.num_tokens
    # the state entering the sparse part becomes a leaf, so its gradient shows what reads it
    entry = {}

    def make_leaf(module, args, out):
        entry["h"] = out.detach().requires_grad_()
        return entry["h"]

    model.blocks.blocks[start - 1].register_forward_hook(make_leaf)
    seen = block_tokens(model)
    out = model(*inputs(), mask_ratio=0.75, hidden_at=end)  # the last sparse block's output
    k = kept_token_count(n, 0.75)
    assert seen == [(i, k if start <= i < end else n) for i in range(model.depth)]
    kept = torch.zeros(3, n, dtype=torch.bool).scatter_(1, out.keep_ids, True)
    assert kept.sum(1).tolist() == [k] * 3

    (through_sparse,) = torch.autograd.grad(out.hidden.square().sum(), entry["h"], retain_graph=True)
    per_token = through_sparse.abs().sum(-1)
    assert torch.all(per_token[~kept] == 0)  # a dropped token never reaches a sparse block
    assert torch.all(per_token[kept] > 0)
    (through_all,) = torch.autograd.grad(out.sample.square().sum(), entry["h"])
    assert torch.all(through_all.abs().sum(-1)[~kept] > 0)  # ... but the dense blocks after it read it


def test_tread_at_ratio_zero_is_exactly_dit():
    tread = randomize(tiny("TREAD-S/2")).eval()
    dit = DiT(**TINY).eval()
    dit.load_state_dict(tread.state_dict())  # strict: TREAD adds no parameter
    x, t, y = inputs()
    assert torch.equal(tread(x, t, y).sample, dit(x, t, y).sample)
    a, b = tread(x, t, y, hidden_at=3), dit(x, t, y, hidden_at=3)
    assert torch.equal(a.hidden, b.hidden) and a.keep_ids is None


def test_sprint_at_ratio_zero_is_its_blocks_run_densely():
    model = randomize(tiny("SPRINT-S/2")).eval()
    x, t, y = inputs()
    with torch.no_grad():
        h, c = model.embed(x, t, y)
        for i in range(2):
            h = model.blocks.blocks[i](h, c)
        dense = h
        for i in range(2, 4):
            h = model.blocks.blocks[i](h, c)
        h = model.fusion(torch.cat([h, dense], dim=-1))
        for i in range(4, 6):
            h = model.blocks.blocks[i](h, c)
        expected = unpatchify(model.final_layer(h, c), 2, model.out_channels, model.grid_size)
        assert torch.equal(model(x, t, y).sample, expected)
        assert torch.equal(model(x, t, y, mask_ratio=0.0).sample, expected)


def test_sprint_loads_a_dit_checkpoint_of_the_same_size():
    missing, unexpected = tiny("SPRINT-S/2").load_state_dict(DiT(**TINY).state_dict(), strict=False)
    assert sorted(missing) == ["fusion.bias", "fusion.weight", "mask_token"] and unexpected == []


def sprint_with_sparse_output(model, x, t, y, sparse_fill):
    """SPRINT's output with the middle blocks' result replaced by `sparse_fill` [B, N, D]."""
    h, c = model.embed(x, t, y)
    for i in range(model.sparse_start):
        h = model.blocks.blocks[i](h, c)
    h = model.fusion(torch.cat([sparse_fill.expand_as(h), h], dim=-1))
    for i in range(model.sparse_end, model.depth):
        h = model.blocks.blocks[i](h, c)
    return unpatchify(model.final_layer(h, c), model.patch_size, model.out_channels, model.grid_size)


def test_path_drop_replaces_exactly_the_chosen_samples():
    model = randomize(tiny("SPRINT-S/2", class_dropout_prob=0.0, path_drop_prob=0.0))
    x, t, y = inputs()
    drop = torch.tensor([False, True, False])
    with torch.no_grad():
        dropped_only = sprint_with_sparse_output(model, x, t, y, model.mask_token)
        for mode in ("train", "eval"):
            getattr(model, mode)()
            torch.manual_seed(1)
            base = model(x, t, y, mask_ratio=0.5).sample
            torch.manual_seed(1)
            out = model(x, t, y, mask_ratio=0.5, path_drop=drop).sample
            # train mode computes every sample and replaces: bitwise; eval mode runs the middle
            # blocks on the kept samples only (another batch size, so another reduction order)
            tol = dict(rtol=0, atol=0) if mode == "train" else dict(rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out[~drop], base[~drop], **tol)
            torch.testing.assert_close(out[drop], dropped_only[drop], rtol=1e-5, atol=1e-6)
            assert not torch.allclose(out[drop], base[drop])


def test_path_drop_of_every_sample_skips_the_middle_at_sampling():
    model = randomize(tiny("SPRINT-S/2")).eval()
    seen = block_tokens(model)
    x, t, y = inputs()
    with torch.no_grad():
        out = model(x, t, y, path_drop=torch.ones(3, dtype=torch.bool)).sample
        assert [i for i, _ in seen] == [0, 1, 4, 5]
        torch.testing.assert_close(out, sprint_with_sparse_output(model, x, t, y, model.mask_token))
    with pytest.raises(ValueError, match=r"path_drop must have shape \[3\]"):
        model(x, t, y, path_drop=torch.ones(2, dtype=torch.bool))


def test_random_path_drop_keeps_every_parameter_in_the_graph():
    model = randomize(tiny("SPRINT-S/2", path_drop_prob=1.0))  # train mode: every sample dropped
    seen = block_tokens(model)
    model(*inputs(), mask_ratio=0.5).sample.square().mean().backward()
    assert [i for i, _ in seen] == list(range(6))  # the middle still runs: same FLOPs
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert torch.count_nonzero(model.blocks.blocks[2].mlp.fc1.weight.grad) == 0
    assert torch.count_nonzero(model.mask_token.grad) > 0


@pytest.mark.parametrize("name", FAMILIES)
def test_every_parameter_gets_a_gradient_at_ratio_zero_and_masked(name):
    model = randomize(tiny(name)).eval()
    model(*inputs()).sample.square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    if name.startswith("SPRINT"):
        assert torch.count_nonzero(model.mask_token.grad) == 0  # used, but contributes nothing at r = 0
    model.zero_grad()
    model(*inputs(), mask_ratio=0.5).sample.square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def block_flops(width: int, heads: int, tokens: int) -> int:
    counter = FlopCounterMode(display=False, custom_mapping=flop_mapping())
    with counter, torch.no_grad(), attention_backend("sdpa"):
        AdaLNBlock(width, heads)(torch.randn(1, tokens, width), torch.randn(1, width))
    return counter.get_total_flops()


@pytest.mark.parametrize("name", FAMILIES)
def test_flops_count_the_real_forward(name):
    kw = {**TINY, **LAYOUT[name]}
    model = build_model(name, **kw)  # train mode, as count_flops calls it
    n, k = model.num_tokens, kept_token_count(model.num_tokens, 0.75)
    counter = FlopCounterMode(display=False, custom_mapping=flop_mapping())
    with counter, torch.no_grad(), attention_backend("sdpa"):
        model(*inputs(1), mask_ratio=0.75)
    sparse = model_flops(name, mask_ratio=0.75, **kw)
    assert sparse == counter.get_total_flops()
    dense = model_flops(name, **kw)
    saved = (model.sparse_end - model.sparse_start) * (block_flops(64, 2, n) - block_flops(64, 2, k))
    assert sparse == dense - saved < dense
    fusion = 2 * n * (2 * 64) * 64 if name.startswith("SPRINT") else 0  # the only extra layer
    assert dense == model_flops("DiT-S/2", **TINY) + fusion


def test_flops_at_xl2_against_dit():
    dit = model_flops("DiT-XL/2")
    sprint = model_flops("SPRINT-XL/2", mask_ratio=0.75) / dit
    tread = model_flops("TREAD-XL/2", mask_ratio=0.5) / dit
    assert 0.33 < sprint < 0.38  # 4 dense blocks + 24 at a quarter of the tokens + the fusion
    assert 0.56 < tread < 0.60  # 5 dense blocks + 23 routed at half
    assert main(["SPRINT-S/2", "TREAD-S/2", "--input-size", "8", "--mask-ratio", "0.75"]) == 0


@pytest.mark.parametrize("name", FAMILIES)
def test_hidden_at_a_sparse_block_gives_the_kept_tokens_and_their_positions(name):
    model = randomize(tiny(name)).eval()
    start, n, d = model.sparse_start, model.num_tokens, model.hidden_size
    x, t, y = inputs()
    leaving = []
    model.blocks.blocks[start].register_forward_hook(lambda m, a, out: leaving.append(out))
    torch.manual_seed(5)
    out = model(x, t, y, mask_ratio=0.5, hidden_at=start + 1)
    torch.manual_seed(5)
    assert torch.equal(out.keep_ids, random_token_mask(3, n, 0.5, torch.device("cpu")).ids_keep)
    assert out.hidden.shape == (3, n // 2, d) and torch.equal(out.hidden, leaving[-1])
    for block in (start, model.sparse_end + 1, model.depth):  # the dense ones: every token
        dense = model(x, t, y, mask_ratio=0.5, hidden_at=block)
        assert dense.hidden.shape == (3, n, d) and dense.keep_ids is None
    unmasked = model(x, t, y, hidden_at=start + 1)
    assert unmasked.hidden.shape == (3, n, d) and unmasked.keep_ids is None
    with pytest.raises(ValueError, match=r"hidden_at must be in \[1, 6\]"):
        model(x, t, y, hidden_at=7)


@pytest.mark.parametrize("mode", ["torch", "deepspeed", "fairscale"])
@pytest.mark.parametrize("name", FAMILIES)
def test_checkpointing_gives_the_same_gradients(name, mode):
    model = randomize(tiny(name))  # train mode: label dropout and SPRINT's path drop are drawn too
    grads = {}
    for setting in ("none", mode):
        net = copy.deepcopy(model)
        net.set_checkpointing(setting)
        torch.manual_seed(7)
        out = net(*inputs(), mask_ratio=0.5, hidden_at=net.sparse_start + 1)
        (out.sample.square().mean() + out.hidden.square().mean()).backward()
        grads[setting] = {k: p.grad for k, p in net.named_parameters()}
    for key, ref in grads["none"].items():
        torch.testing.assert_close(grads[mode][key], ref, rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize("name", FAMILIES)
def test_refusals_are_one_line(name):
    with pytest.raises(ValueError, match="skip=True") as err:
        tiny(name, skip=True)
    assert "\n" not in str(err.value)
    model = tiny(name)
    with pytest.raises(ValueError, match="Skip-Cache"):
        model.new_skip_cache(1)
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        model(*inputs(), mask_ratio=1.0)
    bad = dict(dense_in=3, dense_out=3) if name.startswith("SPRINT") else dict(route_start=4, route_end=4)
    with pytest.raises(ValueError, match="depth 6"):
        tiny(name, **bad)


def test_registry_names_build_with_their_own_options():
    for size in ("S", "B", "L", "XL", "H"):
        for patch in (2, 4, 8):
            assert MODELS[f"SPRINT-{size}/{patch}"].can_mask and MODELS[f"TREAD-{size}/{patch}"].can_mask
    assert [MODELS[n].family for n in ("DiT-B/2", "MaskDiT-B/2", "SPRINT-B/2", "TREAD-B/2")] == [
        "dense", "maskdit", "sprint", "tread"]
    assert not MODELS["DiT-B/2"].can_mask
    with torch.device("meta"):
        tread = build_model("TREAD-B/2")
        sprint = build_model("SPRINT-XL/2")
    assert (tread.route_start, tread.route_end) == (2, 9)  # the release's DiT-B/2 route, blocks 2..8
    assert (sprint.sparse_start, sprint.sparse_end) == (2, 26)
    assert tiny("SPRINT-S/2", dense_in=1, dense_out=3, path_drop_prob=0.2).path_drop_prob == 0.2
    with pytest.raises(ValueError, match="unknown option 'route_start' for model SPRINT-S/2"):
        build_model("SPRINT-S/2", route_start=1)
    with pytest.raises(ValueError, match="unknown option 'dense_in' for model TREAD-S/2"):
        build_model("TREAD-S/2", dense_in=1)
    with pytest.raises(ValueError, match="unknown option 'decoder_depth'"):
        build_model("TREAD-S/2", decoder_depth=1)
    with pytest.raises(ValueError, match="unknown option 'path_drop_prob' for model DiT-S/2"):
        build_model("DiT-S/2", path_drop_prob=0.1)


@pytest.mark.parametrize("name", FAMILIES)
def test_objective_trains_them_masked_with_the_loss_on_every_token(name):
    model = randomize(tiny(name))
    den = Denoiser(model, make_preconditioning("edm"))
    x0, _, y = inputs(4)
    noise, sigma = torch.randn_like(x0), torch.tensor([0.1, 0.5, 1.0, 5.0])
    head = torch.nn.Linear(64, 8)
    align = Alignment(head, torch.randn(4, model.num_tokens, 8), model.sparse_start + 1, 0.5)
    out = maskdit_loss(den, x0, y, sigma, noise, 0.75, LossWeighting("min_snr"), align=align)
    assert torch.isfinite(out.loss).all() and (out.mae == 0).all()  # no mask: no MAE term
    out.loss.mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert head.weight.grad is not None
