"""FLOP counter: reference figures, CPU attention counted, MaskDiT's saving at XL/2."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from model_zoo.flops import count_flops, main, model_flops
from model_zoo.registry import build_model


def test_dit_xl2_forward_matches_reference_gflops():
    # DiT paper: 118.6 GMACs per forward at 256x256 = 237.2 GFLOPs.
    assert abs(model_flops("DiT-XL/2") / 1e9 - 237.2) < 0.1


def test_maskdit_xl2_forward_is_at_most_56_percent_of_dit():
    ratio = model_flops("MaskDiT-XL/2", mask_ratio=0.5) / model_flops("DiT-XL/2")
    assert 0.5 < ratio <= 0.56


def test_cpu_attention_is_counted():
    model = build_model("DiT-S/2", input_size=8, hidden_size=64, depth=1, num_heads=2, num_classes=10)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.zeros(2, dtype=torch.long)
    plain = FlopCounterMode(display=False)
    with plain:
        model(x, t, y)
    ours = count_flops(model, batch_size=2)
    n, d = model.num_tokens, model.hidden_size
    attention = 2 * (2 * 2 * n * n * d)  # batch 2; QK^T and AV, each 2*N*N*D FLOPs
    assert ours - plain.get_total_flops() == attention


def test_training_step_is_about_three_forwards():
    fwd = model_flops("DiT-S/2")
    step = model_flops("DiT-S/2", backward=True)
    assert 2.9 < step / fwd < 3.1


def test_cli_prints_a_table(capsys):
    assert main(["DiT-S/2", "MaskDiT-S/2", "--input-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "MaskDiT-S/2" in out and "fwd GFLOPs" in out
    assert main(["DiT-Q/2"]) == 2
