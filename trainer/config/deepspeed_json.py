"""The DeepSpeed JSON a launch config implies on a given device type (the caller names it: this
package imports nothing of DeepSpeed or the runtime)."""

from __future__ import annotations

from typing import Any, Dict

import torch

from .schema import DeepSpeedSection, TrainConfig

PRECISIONS: Dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""deepspeed.precision: name -> the dtype the engine trains in."""


def _deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def zero_section(ds: DeepSpeedSection, device_type: str) -> Dict[str, Any]:
    """DeepSpeed's zero_optimization block for these settings on a `device_type` ('cpu', 'cuda', ...)."""
    zero: Dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        contiguous = ds.contiguous_gradients if ds.contiguous_gradients is not None else device_type != "cpu"
        zero.update(overlap_comm=False, contiguous_gradients=contiguous)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    return zero


def to_deepspeed_json(cfg: TrainConfig, world_size: int, device_type: str) -> Dict[str, Any]:
    """The DeepSpeed config dict for this launch config and world size on `device_type` ('cpu',
    'cuda', ...; trainer.training.engine.deepspeed_config passes the accelerator's).

    The lr schedule is not DeepSpeed's: the phase plan scales the lr per step, so the optimizer
    is created with the peak lr and the loop sets each group's lr.
    """
    ds, o = cfg.deepspeed, cfg.optim
    zero = zero_section(ds, device_type)
    out: Dict[str, Any] = {
        "train_batch_size": cfg.data.batch_size,
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.accumulation_steps(world_size),
        "gradient_clipping": o.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
                       **({"torch_adam": True, "fused": True} if o.torch_adam else {})},
        },
        "zero_optimization": zero,
        # check_grad_overflow (DeepSpeed's default, spelled out): a bf16 update with non-finite
        # gradients is skipped and counted, which the trainer's non-finite guard relies on
        "bf16": {"enabled": ds.precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16, "loss_scale_window": 1000},
        "steps_per_print": 10**9,  # our monitor prints; keep DeepSpeed's own log quiet
        "wall_clock_breakdown": False,
    }
    return _deep_merge(out, ds.extra)
