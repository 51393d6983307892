"""FLOP counting for registry models with torch.utils.flop_counter.

torch's counter has no formula for the CPU attention kernels, so attention would count as zero on
CPU (about 10% of DiT-S/2); we register torch's own SDPA formulas for them. Counting runs on the
meta device by default: shapes only, no memory, no time.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from .layers import attention_backend
from .registry import MODELS, build_model

aten = torch.ops.aten


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# CPU kernels torch dispatches scaled_dot_product_attention to; same maths as the CUDA flash kernels.
_CPU_ATTENTION_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop,
}


def flop_mapping() -> Dict:
    """Custom formulas to pass to FlopCounterMode so CPU attention is counted."""
    return dict(_CPU_ATTENTION_FORMULAS)


def count_flops(
    model: torch.nn.Module,
    batch_size: int = 1,
    mask_ratio: float = 0.0,
    backward: bool = False,
    device: torch.device | None = None,
) -> int:
    """FLOPs (multiply-add = 2) of one forward, or forward + backward, of a registry network.

    The model is called as in training: random latents, noise levels and labels of the model's
    shapes; mask_ratio applies to the networks that drop tokens (class attribute can_mask).
    """
    device = device or next(model.parameters()).device
    x = torch.randn(batch_size, model.in_channels, model.input_size, model.input_size, device=device)
    t = torch.rand(batch_size, device=device)
    y = torch.zeros(batch_size, dtype=torch.long, device=device)
    kwargs = {"mask_ratio": mask_ratio} if mask_ratio else {}
    counter = FlopCounterMode(display=False, custom_mapping=flop_mapping())
    # One definition of a model's FLOPs: SDPA's formulas, whichever attention form runs in training.
    with counter, torch.set_grad_enabled(backward), attention_backend("sdpa"):
        out = model(x, t, y, **kwargs).sample
        if backward:
            out.float().square().mean().backward()
    return counter.get_total_flops()


@torch.no_grad()
def sampling_flops(model: torch.nn.Module, *, path_drop: bool = False, skip_keep: int | None = None) -> int:
    """FLOPs of one image's forward at sampling (eval mode, no gradients): the whole network; with
    path_drop, a SPRINT network with its sparse path dropped (path-drop guidance's weak branch);
    with skip_keep, a Skip-Cache reuse step that runs only the first and last skip_keep blocks.
    Best on a model built on the meta device (shapes only)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = torch.randn(1, model.in_channels, model.input_size, model.input_size, device=device)
    t = torch.rand(1, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    kwargs: Dict = {"path_drop": True} if path_drop else {}
    if skip_keep is not None:
        cache = model.new_skip_cache(skip_keep)
        model(x, t, y, skip_cache=cache)  # the refresh step fills the cache (not counted)
        kwargs.update(skip_cache=cache, reuse_cache=True)
    counter = FlopCounterMode(display=False, custom_mapping=flop_mapping())
    try:
        with counter, attention_backend("sdpa"):
            model(x, t, y, **kwargs)
    finally:
        model.train(was_training)
    return counter.get_total_flops()


def model_flops(name: str, batch_size: int = 1, mask_ratio: float = 0.0, backward: bool = False,
                **overrides) -> int:
    """Build a registry model on the meta device and count its FLOPs (no memory used)."""
    with torch.device("meta"):
        model = build_model(name, **overrides)
    return count_flops(model, batch_size, mask_ratio, backward, device=torch.device("meta"))


class FlopsPerImage:
    """Training FLOPs (forward + backward) of one image through a registry network at a mask ratio,
    counted once per ratio (rounded to 2 decimals). `kwargs` are the network's constructor
    arguments; class_dropout_prob is left out (it changes no shape)."""

    def __init__(self, name: str, kwargs: Dict):
        self.name, self.kwargs = name, {k: v for k, v in kwargs.items() if k != "class_dropout_prob"}
        self._cache: Dict[float, float] = {}

    def __call__(self, mask_ratio: float) -> float:
        key = round(mask_ratio, 2)
        if key not in self._cache:
            self._cache[key] = float(model_flops(self.name, 1, key, backward=True, **self.kwargs))
        return self._cache[key]


def main(argv: list | None = None) -> int:
    """CLI: print forward and training-step GFLOPs per sample for registry models."""
    parser = argparse.ArgumentParser(prog="mdt-flops", description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help=f"registry names, e.g. DiT-XL/2 (choices: {', '.join(MODELS)})")
    parser.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256px with an f8 VAE)")
    parser.add_argument("--mask-ratio", type=float, default=0.5,
                        help="applied to the models that drop tokens (MaskDiT, SPRINT, TREAD)")
    args = parser.parse_args(argv)
    print(f"{'model':<16}{'params (M)':>12}{'fwd GFLOPs':>12}{'fwd+bwd GFLOPs':>16}")
    for name in args.models:
        try:
            ratio = args.mask_ratio if name in MODELS and MODELS[name].can_mask else 0.0
            with torch.device("meta"):
                model = build_model(name, input_size=args.input_size)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            fwd = count_flops(model, 1, ratio, False, torch.device("meta")) / 1e9
            step = count_flops(model, 1, ratio, True, torch.device("meta")) / 1e9
        except ValueError as err:
            print(f"mdt-flops: {err}", file=sys.stderr)
            return 2
        print(f"{name:<16}{params:>12.1f}{fwd:>12.2f}{step:>16.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
