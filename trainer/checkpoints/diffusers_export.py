"""Our DiT as a diffusers folder: `DiTTransformer2DModel.from_pretrained(DIR)` loads it and
`DDIMScheduler.from_pretrained(DIR)` (or EDMEulerScheduler for EDM-trained models) reads a scheduler
config matching how it was trained. Written directly (config.json, diffusion_pytorch_model.
safetensors, scheduler_config.json): no diffusers model is built here.

Facts a diffusers user must know (docs/releases.md measures them):
- diffusers' DiT embeds timesteps with frequencies exp(-ln(1e4) k / (half - 1)) (its `Timesteps`
  has downscale_freq_shift=1 hard-coded); ours, like the DiT release, exp(-ln(1e4) k / half). The
  tensors map exactly; outputs agree to float precision once each block's
  `norm1.emb.time_proj.downscale_freq_shift` is set to 0 on the loaded model.
- DiTPipeline's guidance uses label 1000 as the null class: guided sampling needs 1000 classes.
- DiTPipeline does not scale its starting noise by the scheduler's init_noise_sigma: it samples VP
  models (DDIM, init_noise_sigma 1); an EDM model needs a loop that starts from noise x sigma_max.
MaskDiT (its decoder runs at another width), SPRINT (mask token and path fusion) and Skip-DiT
models (long skips) have no diffusers class and are refused; a TREAD model is a DiT at inference
(its routing only drops tokens in training) and exports as one.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict

import torch
from safetensors.torch import save_file

from model_zoo.registry import MODELS

from .readers import NetworkSource
from .record import CheckpointError

DIFFUSERS_VERSION = "0.28.0"
"""Written into the configs (the first diffusers with DiTTransformer2DModel; newer ones read it)."""


def dit_to_diffusers(sd: Dict[str, torch.Tensor], depth: int) -> Dict[str, torch.Tensor]:
    """Our DiT's state_dict in DiTTransformer2DModel's names (q, k, v split out of qkv; the shared
    time and class embedders repeated in every block, as diffusers keeps one per block)."""
    out = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
           "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
           "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
           "proj_out_2.weight": sd["final_layer.linear.weight"], "proj_out_2.bias": sd["final_layer.linear.bias"]}
    for i in range(depth):
        ours, theirs = f"blocks.blocks.{i}.", f"transformer_blocks.{i}."
        emb = theirs + "norm1.emb."
        for part in ("weight", "bias"):
            out[f"{emb}timestep_embedder.linear_1.{part}"] = sd[f"t_embedder.mlp.0.{part}"]
            out[f"{emb}timestep_embedder.linear_2.{part}"] = sd[f"t_embedder.mlp.2.{part}"]
            out[f"{theirs}norm1.linear.{part}"] = sd[f"{ours}adaLN_modulation.1.{part}"]
            q, k, v = sd[f"{ours}attn.qkv.{part}"].chunk(3, dim=0)
            out[f"{theirs}attn1.to_q.{part}"], out[f"{theirs}attn1.to_k.{part}"] = q, k
            out[f"{theirs}attn1.to_v.{part}"] = v
            out[f"{theirs}attn1.to_out.0.{part}"] = sd[f"{ours}attn.proj.{part}"]
            out[f"{theirs}ff.net.0.proj.{part}"] = sd[f"{ours}mlp.fc1.{part}"]
            out[f"{theirs}ff.net.2.{part}"] = sd[f"{ours}mlp.fc2.{part}"]
        out[f"{emb}class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def transformer_config(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """DiTTransformer2DModel's config for our DiT constructor arguments."""
    hidden, heads = kwargs["hidden_size"], kwargs["num_heads"]
    channels = kwargs["in_channels"]
    return {"_class_name": "DiTTransformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
            "num_attention_heads": heads, "attention_head_dim": hidden // heads, "in_channels": channels,
            "out_channels": 2 * channels if kwargs.get("learn_sigma", True) else channels,
            "num_layers": kwargs["depth"], "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True,
            "sample_size": kwargs["input_size"], "patch_size": kwargs["patch_size"],
            "activation_fn": "gelu-approximate", "num_embeds_ada_norm": kwargs["num_classes"],
            "upcast_attention": False, "norm_type": "ada_norm_zero", "norm_elementwise_affine": False,
            "norm_eps": 1e-6}  # DiT's LayerNorms use 1e-6 (diffusers' default is 1e-5)


BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
PREDICTIONS = {"vp_eps": "epsilon", "vp_v": "v_prediction", "vp_x0": "sample"}


def scheduler_config(diffusion: Dict[str, Any]) -> Dict[str, Any]:
    """A diffusers scheduler config for how the model was trained: DDIM on the training DDPM
    schedule for VP models, EDM's Euler (Karras sigmas, sigma_data) for EDM models."""
    precond = diffusion.get("preconditioning", "edm")
    if precond == "edm":
        return {"_class_name": "EDMEulerScheduler", "_diffusers_version": DIFFUSERS_VERSION, "sigma_min": 0.002,
                "sigma_max": 80.0, "sigma_data": float(diffusion.get("sigma_data", 0.5)), "sigma_schedule": "karras",
                "num_train_timesteps": 1000, "prediction_type": "epsilon", "rho": 7.0}
    sampler = diffusion.get("sigma_sampler", "ddpm_linear")
    kind = sampler.removeprefix("ddpm_").removesuffix("_zsnr")
    if precond not in PREDICTIONS or not sampler.startswith("ddpm_") or kind not in BETA_SCHEDULES:
        raise CheckpointError(f"no diffusers scheduler for preconditioning {precond!r} with sigma sampler {sampler!r}")
    return {"_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION, "num_train_timesteps": 1000,
            "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": BETA_SCHEDULES[kind],
            "prediction_type": PREDICTIONS[precond], "clip_sample": False, "set_alpha_to_one": True,
            "steps_offset": 0, "timestep_spacing": "leading", "rescale_betas_zero_snr": sampler.endswith("_zsnr")}


def export_diffusers(src: NetworkSource, out_dir: str) -> Dict[str, Any]:
    """Write `src` (a DiT without skip branches) as a diffusers folder; returns the transformer
    config. One-line CheckpointError for what diffusers cannot hold."""
    kwargs = src.model_kwargs
    if "decoder_depth" in kwargs or src.model_name.startswith("MaskDiT"):
        raise CheckpointError(f"{src.path}: MaskDiT has no diffusers model class (its decoder runs at another "
                              "width); use mdt-export's safetensors file with mdt-sample")
    if src.model_name in MODELS and MODELS[src.model_name].family == "sprint":
        raise CheckpointError(f"{src.path}: SPRINT has no diffusers model class (its mask token and the fusion of "
                              "the sparse and dense paths); use mdt-export's safetensors file with mdt-sample")
    if kwargs.get("skip"):
        raise CheckpointError(f"{src.path}: a Skip-DiT model (model.skip) has no diffusers model class (long "
                              "skips); use mdt-export's safetensors file with mdt-sample")
    if src.kind == "sit-release":
        raise CheckpointError(f"{src.path}: a SiT release is a flow-matching model; this version writes no "
                              "scheduler for it")
    kwargs = {**MODELS[src.model_name].defaults, **kwargs}  # the record holds overrides of the size's defaults
    config = transformer_config(kwargs)
    scheduler = scheduler_config(src.diffusion)
    os.makedirs(out_dir, exist_ok=True)
    save_file(dit_to_diffusers(src.state_dict, kwargs["depth"]),
              os.path.join(out_dir, "diffusion_pytorch_model.safetensors"))
    for name, data in (("config.json", config), ("scheduler_config.json", scheduler)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(data, f, indent=2)
    return config
