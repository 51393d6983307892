"""Activation checkpointing gives the same gradients; Skip-Cache reproduces the plain forward."""

import pytest
import torch

from model_zoo.registry import build_model

from test_model_zoo import TINY, TINY_DECODER, inputs, randomize


def grads_of(model, mask_ratio):
    model.zero_grad()
    torch.manual_seed(7)  # same mask draw in every run
    out = model(*inputs(), mask_ratio=mask_ratio)
    (out.sample.square().mean()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode,offload", [("torch", False), ("deepspeed", False), ("fairscale", False),
                                          ("fairscale", True)])
@pytest.mark.parametrize("name,mask_ratio", [("DiT-S/2", 0.0), ("MaskDiT-S/2", 0.5)])
def test_checkpointing_gradients_match(mode, offload, name, mask_ratio):
    extra = TINY_DECODER if name.startswith("MaskDiT") else {}
    model = randomize(build_model(name, **{**TINY, **extra, "depth": 4, "skip": True, "class_dropout_prob": 0.0}))
    reference = grads_of(model, mask_ratio)
    model.set_checkpointing(mode, offload=offload)
    checkpointed = grads_of(model, mask_ratio)
    for key, ref in reference.items():
        torch.testing.assert_close(checkpointed[key], ref, rtol=1e-5, atol=1e-7, msg=key)
    # switching back removes the wrapper and keeps parameter names
    model.set_checkpointing("none")
    assert "forward" not in model.blocks.blocks[0].__dict__
    assert set(model.state_dict()) == set(build_model(name, **{**TINY, **extra, "depth": 4, "skip": True}).state_dict())


def _blocks(model):
    blocks = list(model.blocks.blocks)
    return blocks + (list(model.decoder.blocks) if hasattr(model, "decoder") else [])


def recompute_profile(model, mask_ratio: float):
    """(block forwards in the forward pass, block forwards during backward, bytes held for backward).

    Blocks are counted through their MLP, which every block's forward calls once, however the
    block itself is wrapped. The bytes are a tally of the distinct storages autograd packs for the
    backward pass outside any checkpointed region (a checkpointed region packs only its inputs):
    the activation memory that checkpointing exists to save, measured without a clock.
    """
    calls = [0]
    hooks = [b.mlp.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for b in _blocks(model)]
    storages = {}

    def pack(t):
        storages[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    try:
        model.zero_grad()
        torch.manual_seed(7)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(*inputs(batch=3), mask_ratio=mask_ratio)
        forward_calls = calls[0]
        out.sample.square().mean().backward()
    finally:
        for h in hooks:
            h.remove()
    return forward_calls, calls[0] - forward_calls, sum(storages.values())


@pytest.mark.parametrize("mode,offload", [("torch", False), ("deepspeed", False), ("fairscale", False),
                                          ("fairscale", True)])
@pytest.mark.parametrize("name,mask_ratio", [("DiT-S/2", 0.0), ("MaskDiT-S/2", 0.5)])
def test_checkpointing_recomputes_every_block_in_backward_and_holds_less(mode, offload, name, mask_ratio):
    extra = TINY_DECODER if name.startswith("MaskDiT") else {}
    model = randomize(build_model(name, **{**TINY, **extra, "depth": 4, "skip": True, "class_dropout_prob": 0.0}))
    blocks = len(_blocks(model))
    plain_fwd, plain_bwd, plain_bytes = recompute_profile(model, mask_ratio)
    assert (plain_fwd, plain_bwd) == (blocks, 0)
    model.set_checkpointing(mode, offload=offload)
    fwd, bwd, held = recompute_profile(model, mask_ratio)
    assert (fwd, bwd) == (blocks, blocks), (mode, fwd, bwd)  # each block runs again in backward
    # the blocks' inner activations are no longer held, only their inputs and the embedding /
    # final layers' (measured at depth 4: 13-17% of the plain run's bytes in every mode)
    assert held < 0.3 * plain_bytes, (mode, held, plain_bytes)


def test_checkpointing_rejects_unknown_mode():
    model = build_model("DiT-S/2", **TINY)
    with pytest.raises(ValueError, match="'sometimes' is not one of"):
        model.set_checkpointing("sometimes")
    with pytest.raises(ValueError, match="needs mode 'fairscale'"):
        model.set_checkpointing("torch", offload=True)


@pytest.mark.parametrize("name", ["DiT-S/2", "MaskDiT-S/2"])
@pytest.mark.parametrize("n_keep", [1, 2, 3])
def test_skip_cache_reproduces_plain_forward_bit_for_bit(name, n_keep):
    extra = TINY_DECODER if name.startswith("MaskDiT") else {}
    model = randomize(build_model(name, **{**TINY, **extra, "depth": 7, "skip": True})).eval()
    cache = model.new_skip_cache(n_keep)
    x, t, y = inputs()
    with torch.no_grad():
        for step in range(3):  # a sampler's loop with the cache refreshed at every step
            xs, ts = x * (1 + step), t + step
            plain = model(xs, ts, y).sample
            refreshed = model(xs, ts, y, skip_cache=cache).sample
            assert torch.equal(refreshed, plain)
            # a cached step on the same input reuses exactly the deep state it would compute
            assert torch.equal(model(xs, ts, y, skip_cache=cache, reuse_cache=True).sample, plain)
        # on a new input the cached step is an approximation, not the plain forward
        approx = model(x * 5, t + 3, y, skip_cache=cache, reuse_cache=True).sample
        assert not torch.equal(approx, model(x * 5, t + 3, y).sample)
    assert cache.full_calls == 3 and cache.cached_calls == 4
    assert cache.blocks_run == 3 * 7 + 4 * 2 * n_keep


def test_skip_cache_runs_only_shallow_and_deep_blocks():
    model = build_model("DiT-S/2", **{**TINY, "depth": 8, "skip": True}).eval()
    ran = []
    for i, block in enumerate(model.blocks.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    cache = model.new_skip_cache(2)
    with torch.no_grad():
        model(*inputs(), skip_cache=cache)
        assert ran == list(range(8))
        ran.clear()
        model(*inputs(), skip_cache=cache, reuse_cache=True)
    assert ran == [0, 1, 6, 7]


def test_skip_cache_errors():
    plain = build_model("DiT-S/2", **TINY)
    with pytest.raises(ValueError, match="skip=True"):
        plain.new_skip_cache(1)
    model = build_model("DiT-S/2", **{**TINY, "depth": 4, "skip": True})
    with pytest.raises(ValueError, match=r"n_keep must be in \[1, 2\]"):
        model.new_skip_cache(3)
    cache = model.new_skip_cache(1)
    with pytest.raises(ValueError, match="run a refresh step first"):
        model(*inputs(), skip_cache=cache, reuse_cache=True)
    model(*inputs(batch=2), skip_cache=cache)
    with pytest.raises(ValueError, match="refresh the cache"):
        model(*inputs(batch=3), skip_cache=cache, reuse_cache=True)
    masked = build_model("MaskDiT-S/2", **{**TINY, **TINY_DECODER, "depth": 4, "skip": True})
    with pytest.raises(ValueError, match="sampling mode"):
        masked(*inputs(), mask_ratio=0.5, skip_cache=masked.new_skip_cache(1))
