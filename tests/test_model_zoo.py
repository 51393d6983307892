"""Model zoo: shapes, masking invariants, unused-parameter handling, registry errors, sizes."""

import pytest
import torch

from model_zoo import layers
from model_zoo.layers import attention_backend, gather_tokens, patchify, random_token_mask, unpatchify
from model_zoo.registry import MODELS, build_model

TINY = dict(input_size=16, in_channels=4, num_classes=10, hidden_size=32, depth=2, num_heads=2)
TINY_DECODER = dict(decoder_depth=1, decoder_hidden_size=16, decoder_num_heads=2)
# layouts that fit TINY's 2 blocks: one sparse block each (tests/test_sparse_models.py goes deeper)
TINY_SPARSE = {"SPRINT": dict(dense_in=1, dense_out=0), "TREAD": dict(route_start=1, route_end=2)}


def tiny(name: str, **kw) -> torch.nn.Module:
    extra = TINY_DECODER if name.startswith("MaskDiT") else TINY_SPARSE.get(name.split("-")[0], {})
    return build_model(name, **{**TINY, **extra, **kw})


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Undo adaLN-Zero / zero final layer so that every path affects the output."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs(batch: int = 3, size: int = 16):
    return torch.randn(batch, 4, size, size), torch.rand(batch) * 2 - 1, torch.tensor([0, 5, 10][:batch])


@pytest.mark.parametrize("name", list(MODELS))
def test_every_registry_entry_has_the_right_shapes(name):
    model = tiny(name, learn_sigma=True)
    x, t, y = inputs()
    out = model(x, t, y)
    assert out.sample.shape == (3, 8, 16, 16)
    assert out.mask is None
    if name.startswith("MaskDiT"):
        masked = model(x, t, y, mask_ratio=0.5)
        assert masked.sample.shape == (3, 8, 16, 16)
        assert masked.mask.shape == (3, model.num_tokens)
    elif MODELS[name].can_mask:  # token-sparse: the loss covers every token, so no mask
        masked = model(x, t, y, mask_ratio=0.5)
        assert masked.sample.shape == (3, 8, 16, 16) and masked.mask is None


def test_fresh_model_predicts_zero():
    """adaLN-Zero and the zeroed final layer: an untrained network outputs exactly 0."""
    for name in ("DiT-S/2", "MaskDiT-S/2"):
        out = tiny(name)(*inputs()).sample
        assert torch.count_nonzero(out) == 0


def test_patchify_roundtrip():
    x = torch.randn(2, 4, 8, 8)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 16, 16)
    assert torch.equal(unpatchify(tokens, 2, 4, 4), x)
    # token order is row-major over the patch grid
    assert torch.equal(tokens[:, 1], x[:, :, 0:2, 2:4].permute(0, 2, 3, 1).reshape(2, -1))


def test_random_mask_invariants():
    batch, n = 6, 64
    tm = random_token_mask(batch, n, 0.5, torch.device("cpu"))
    assert tm.ids_keep.shape == (batch, 32)
    assert torch.all(tm.mask.sum(1) == 32)  # same kept count in every sample
    # the kept ids are exactly the unmasked positions
    kept_from_mask = torch.sort(torch.nonzero(tm.mask == 0)[:, 1].view(batch, 32), dim=1).values
    assert torch.equal(kept_from_mask, torch.sort(tm.ids_keep, dim=1).values)
    # ids_restore inverts the shuffle: shuffled = [kept..., dropped...] gathered back = original
    x = torch.arange(n).float().view(1, n, 1).expand(batch, n, 1)
    shuffled = gather_tokens(x, torch.argsort(tm.ids_restore, dim=1))
    assert torch.equal(gather_tokens(shuffled, tm.ids_restore), x)
    # different samples drop different tokens
    assert len({tuple(row.tolist()) for row in tm.mask}) == batch


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_maskdit_kept_count_and_output_covers_all_positions(ratio):
    model = randomize(tiny("MaskDiT-S/2")).eval()
    x, t, y = inputs()
    torch.manual_seed(1)
    out = model(x, t, y, mask_ratio=ratio)
    kept = int(model.num_tokens * (1 - ratio))
    assert torch.all((out.mask == 0).sum(1) == kept)
    assert torch.isfinite(out.sample).all()
    # masked positions are predicted from the mask token: changing it changes exactly those tokens
    with torch.no_grad():
        model.mask_token.add_(1.0)
    torch.manual_seed(1)
    out2 = model(x, t, y, mask_ratio=ratio)
    assert torch.equal(out2.mask, out.mask)
    changed = (patchify(out2.sample - out.sample, model.patch_size).abs().amax(-1) > 0).float()
    assert changed.sum() > 0
    # attention in the decoder mixes tokens, so kept positions may change too, but every masked
    # position must: none is left unpredicted.
    assert torch.all(changed[out.mask.bool()] == 1)


def test_encoder_sees_only_kept_tokens():
    model = tiny("MaskDiT-S/2")
    seen = []
    model.blocks.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    model(*inputs(), mask_ratio=0.75)
    model(*inputs())
    assert seen == [model.num_tokens // 4, model.num_tokens]


@pytest.mark.parametrize("skip", [False, True])
def test_unmasked_path_gives_every_parameter_a_gradient(skip):
    model = randomize(tiny("MaskDiT-S/2", skip=skip, depth=4))
    out = model(*inputs())
    out.sample.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert torch.count_nonzero(model.mask_token.grad) == 0  # used, but contributes nothing at r = 0
    model.zero_grad()
    model(*inputs(), mask_ratio=0.5).sample.square().mean().backward()
    assert torch.count_nonzero(model.mask_token.grad) > 0


def test_dit_rejects_masking_and_bad_input():
    model = tiny("DiT-S/2")
    with pytest.raises(ValueError, match="DiT does not mask"):
        model(*inputs(), mask_ratio=0.5)
    with pytest.raises(ValueError, match=r"expected input of shape \[B, 4, 16, 16\]"):
        model(torch.randn(2, 3, 16, 16), torch.rand(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        tiny("MaskDiT-S/2")(*inputs(), mask_ratio=1.0)


def test_registry_errors_name_the_culprit():
    with pytest.raises(ValueError, match="did you mean MaskDiT-XL/2"):
        build_model("MaskDiT-XL2")
    with pytest.raises(ValueError, match="unknown option 'hiden_size'"):
        build_model("DiT-S/2", hiden_size=8)
    with pytest.raises(ValueError, match="decoder_depth"):
        build_model("DiT-S/2", decoder_depth=2)  # decoder options belong to MaskDiT only


def test_label_dropout_only_in_training():
    model = tiny("DiT-S/2", class_dropout_prob=1.0)
    emb = model.y_embedder
    labels = torch.tensor([1, 2, 3])
    emb.train()
    assert torch.equal(emb(labels), emb.embedding_table.weight[[10, 10, 10]])
    emb.eval()
    assert torch.equal(emb(labels), emb.embedding_table.weight[[1, 2, 3]])


def test_dit_xl2_matches_reference_parameter_count():
    """DiT-XL/2 (learn_sigma, 1000 classes, 256px) has 675,129,632 parameters in the reference.

    The reference stores its fixed sin-cos table as a frozen nn.Parameter; ours is a buffer (it is
    never trained and is rebuilt from the shape), so it is added back for the comparison.
    """
    with torch.device("meta"):
        model = build_model("DiT-XL/2")
    trainable = sum(p.numel() for p in model.parameters())
    assert trainable + model.pos_embed.numel() == 675_129_632
    assert model.pos_embed.numel() == 256 * 1152


def test_math_attention_matches_sdpa_and_auto_picks_it_for_cpu_half_training(monkeypatch):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, requires_grad=True) for _ in range(3))
    grads = {}
    for backend in ("sdpa", "math"):
        with attention_backend(backend):
            out = layers.attention(q, k, v)
        grads[backend] = (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))
    for a, b in zip(grads["sdpa"], grads["math"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    calls = []
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", lambda *a: calls.append(1) or a[2])
    half = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    layers.attention(*half, training=True)  # CPU + bf16 + training: the matmul form
    with torch.no_grad():
        layers.attention(*half, training=True)  # a reentrant checkpoint's first forward: the same form
    assert calls == []
    layers.attention(*half)  # eval (sampling): SDPA
    layers.attention(q, k, v, training=True)  # fp32 training: SDPA
    assert calls == [1, 1]
    with pytest.raises(ValueError, match="flash"):
        with attention_backend("flash"):
            pass
