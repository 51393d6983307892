"""The published checkpoints' weight layouts mapped onto our networks, tensor by tensor, exactly:

- DiT (facebookresearch/DiT `DiT-XL-2-256x256.pt`, `-512x512.pt`) and SiT (willisma/SiT, same
  layout): a bare state_dict. Ours differs in the block list's name (`blocks.N` -> `blocks.blocks.N`)
  and in `pos_embed`, which the release stores and we rebuild (it is checked against ours).
- MaskDiT (Anima-Lab/MaskDiT): the state_dict of its EDMPrecond wrapper (keys `model.*`) under
  `ema` (and `net`). Labels enter there as one-hot vectors through a bias-free Linear; its weight's
  columns are our embedding rows, and the all-zero vector (its unconditional label) is our null row
  of zeros. Its `decoder_layer` is our MaskDiT's decoder_embed='adaln', its `decoder_blocks` our
  `decoder`.

Head counts are not in the weights: the standard widths imply them; other widths need them given.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping

import torch

from .layers import sincos_pos_embed_2d
from .registry import DECODERS, SIZES

LAYOUTS = ("dit", "sit", "maskdit")
"""Release layouts: DiT and SiT share one (a SiT file is told apart by its name or by the caller)."""

HEADS_BY_WIDTH = {dims["hidden_size"]: dims["num_heads"] for dims in SIZES.values()}
DECODER_HEADS_BY_WIDTH = {dims["decoder_hidden_size"]: dims["decoder_num_heads"] for dims in DECODERS.values()}

_DIT_MARKERS = ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "blocks.0.attn.qkv.weight",
                "final_layer.linear.weight")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_DECODER_BLOCK = re.compile(r"^decoder_blocks\.(\d+)\.(.+)$")
_SAME_NAME = re.compile(r"^(x_embedder\.proj|t_embedder\.mlp\.[02]|final_layer\.(linear|adaLN_modulation\.1))"
                        r"\.(weight|bias)$")
_BLOCK_PART = re.compile(r"^(attn\.(qkv|proj)|mlp\.fc[12]|adaLN_modulation\.1)\.(weight|bias)$")


class ReleaseError(ValueError):
    """A file that is not a release this module knows, or whose tensors do not fit; one line."""


@dataclass
class Release:
    """A release converted to our names: the registry model and constructor arguments that take
    `state_dict` exactly (load_state_dict strict), and which layout it came in."""

    layout: str
    model_name: str
    model_kwargs: Dict[str, Any]
    state_dict: Dict[str, torch.Tensor]


def release_state_dict(obj: Any) -> tuple:
    """(layout 'dit' or 'maskdit', the network's state_dict in the release's names) of a loaded
    release file: a bare DiT/SiT state_dict, DiT's training checkpoint ({'model', 'ema', ...}) or
    MaskDiT's ({'ema': EDMPrecond state_dict, ...}). Raises ReleaseError naming what was expected."""
    if not isinstance(obj, Mapping):
        raise ReleaseError(f"expected a state_dict or a dict holding one, found a {type(obj).__name__}")
    inner = next((obj[k] for k in ("ema", "model", "net") if isinstance(obj.get(k), Mapping)), obj)
    keys = [k for k in inner if isinstance(k, str)]
    if keys and all(k.startswith("model.") for k in keys):
        return "maskdit", {k[len("model."):]: v for k, v in inner.items()}
    if all(k in inner for k in _DIT_MARKERS):
        return "dit", dict(inner)
    missing = [k for k in _DIT_MARKERS if k not in inner]
    raise ReleaseError(f"not a DiT, SiT or MaskDiT release: expected the keys {', '.join(_DIT_MARKERS)} (DiT/SiT) "
                       f"or 'model.*' keys under 'ema' (MaskDiT); missing {', '.join(missing)}; first keys found: "
                       f"{', '.join(map(str, list(inner)[:5])) or 'none'}")


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple:
    if key not in sd:
        raise ReleaseError(f"release has no {key!r}")
    return tuple(sd[key].shape)


def _check_table(sd: Mapping[str, torch.Tensor], key: str, width: int, grid: int) -> None:
    """The release's stored sin-cos table must be the one we rebuild (skipped for meta tensors)."""
    table = sd[key]
    if table.is_meta:
        return
    ours = sincos_pos_embed_2d(width, grid)
    if tuple(table.shape[-2:]) != tuple(ours.shape) or not torch.allclose(table.reshape(ours.shape).float(), ours,
                                                                          atol=1e-5):
        raise ReleaseError(f"release's {key} is not the fixed 2-D sin-cos table of width {width} on a {grid}x{grid} "
                           f"grid that this network uses")


def _heads(width: int, given: int | None, table: Dict[int, int], what: str) -> int:
    if given:
        return given
    if width in table:
        return table[width]
    raise ReleaseError(f"the {what} width {width} is not a standard one ({', '.join(map(str, sorted(table)))}): give "
                       f"its head count ({'num_heads' if what == 'encoder' else 'decoder_num_heads'})")


def _size_name(family: str, hidden: int, depth: int, patch: int) -> str:
    for size, dims in SIZES.items():
        if (dims["hidden_size"], dims["depth"]) == (hidden, depth):
            return f"{family}-{size}/{patch}"
    return f"{family}-S/{patch}"  # a custom size: the kwargs carry every dimension


def _encoder(sd: Dict[str, torch.Tensor], out: Dict[str, torch.Tensor], leftover: set) -> Dict[str, int]:
    """Move the parts DiT and MaskDiT share (patch / time embedders, blocks, final layer) into `out`
    under our names; returns the dimensions they imply."""
    hidden, channels, patch, _ = _shape(sd, "x_embedder.proj.weight")
    tokens = _shape(sd, "pos_embed")[-2]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ReleaseError(f"release's pos_embed has {tokens} positions, not a square grid")
    _check_table(sd, "pos_embed", hidden, grid)
    leftover.discard("pos_embed")
    for key in [k for k in leftover if _SAME_NAME.match(k)]:
        out[key] = sd[key]
        leftover.discard(key)
    depth = _move_blocks(sd, out, leftover, _BLOCK, "blocks.blocks")
    return {"hidden": hidden, "channels": channels, "patch": patch, "grid": grid, "depth": depth}


def _move_blocks(sd: Dict[str, torch.Tensor], out: Dict[str, torch.Tensor], leftover: set, pattern: re.Pattern,
                 ours: str) -> int:
    """Move the transformer blocks matching `pattern` (index, part) into `out` as `ours.N.part`;
    returns how many blocks there are."""
    depth = 0
    for key in list(leftover):
        m = pattern.match(key)
        if m and _BLOCK_PART.match(m.group(2)):
            out[f"{ours}.{m.group(1)}.{m.group(2)}"] = sd[key]
            depth = max(depth, int(m.group(1)) + 1)
            leftover.discard(key)
    return depth


def _done(out: Dict[str, torch.Tensor], leftover: set, layout: str) -> None:
    if leftover:
        raise ReleaseError(f"{len(leftover)} tensors of the {layout} release fit no tensor of ours, first: "
                           f"{', '.join(sorted(leftover)[:5])}")


def convert_dit(sd: Dict[str, torch.Tensor], layout: str = "dit", num_heads: int | None = None) -> Release:
    """A DiT or SiT release (bare state_dict) as our DiT."""
    if layout not in ("dit", "sit"):
        raise ReleaseError(f"convert_dit takes the dit or sit layout, not {layout!r}")
    out: Dict[str, torch.Tensor] = {}
    leftover = set(sd)
    dims = _encoder(sd, out, leftover)
    rows, hidden = _shape(sd, "y_embedder.embedding_table.weight")
    out["y_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
    leftover.discard("y_embedder.embedding_table.weight")
    _done(out, leftover, layout)
    per_patch = dims["patch"] ** 2 * dims["channels"]
    out_features = _shape(sd, "final_layer.linear.weight")[0]
    if out_features not in (per_patch, 2 * per_patch):
        raise ReleaseError(f"final_layer.linear.weight has {out_features} outputs; expected {per_patch} or "
                           f"{2 * per_patch} for {dims['channels']} channels and patch {dims['patch']}")
    kwargs = {"input_size": dims["grid"] * dims["patch"], "patch_size": dims["patch"], "in_channels": dims["channels"],
              "hidden_size": hidden, "depth": dims["depth"],
              "num_heads": _heads(hidden, num_heads, HEADS_BY_WIDTH, "encoder"),
              # the release's table has the null class as its last row (trained with label dropout)
              "num_classes": rows - 1, "learn_sigma": out_features == 2 * per_patch}
    return Release(layout, _size_name("DiT", hidden, dims["depth"], dims["patch"]), kwargs, out)


def convert_maskdit(sd: Dict[str, torch.Tensor], num_heads: int | None = None,
                    decoder_num_heads: int | None = None) -> Release:
    """A MaskDiT release (its EDMPrecond state_dict without the `model.` prefix) as our MaskDiT with
    decoder_embed='adaln'."""
    out: Dict[str, torch.Tensor] = {}
    leftover = set(sd)
    dims = _encoder(sd, out, leftover)
    hidden = dims["hidden"]
    width = _shape(sd, "mask_token")[-1]
    _check_table(sd, "decoder_pos_embed", width, dims["grid"])
    out["mask_token"] = sd["mask_token"]
    leftover -= {"mask_token", "decoder_pos_embed"}
    # one-hot labels through Linear(num_classes -> hidden, no bias): column k is class k's vector;
    # the all-zero one-hot (unconditional) gives zeros, our null row
    weight = sd["y_embedder.embedding_table.weight"]
    if weight.dim() != 2 or weight.shape[0] != hidden:
        raise ReleaseError(f"y_embedder.embedding_table.weight has shape {tuple(weight.shape)}; MaskDiT's is "
                           f"[{hidden}, num_classes]")
    out["y_embedder.embedding_table.weight"] = torch.cat([weight.t(), weight.new_zeros(1, hidden)])
    leftover.discard("y_embedder.embedding_table.weight")
    # the decoder_layer has the final layer's parts (norm, adaLN modulation, linear)
    for key in [k for k in leftover if k.startswith("decoder_layer.")
                and _SAME_NAME.match("final_layer." + k[len("decoder_layer."):])]:
        out[key] = sd[key]
        leftover.discard(key)
    decoder_depth = _move_blocks(sd, out, leftover, _DECODER_BLOCK, "decoder.blocks")
    _done(out, leftover, "maskdit")
    per_patch = dims["patch"] ** 2 * dims["channels"]
    out_features = _shape(sd, "final_layer.linear.weight")[0]
    kwargs = {"input_size": dims["grid"] * dims["patch"], "patch_size": dims["patch"], "in_channels": dims["channels"],
              "hidden_size": hidden, "depth": dims["depth"],
              "num_heads": _heads(hidden, num_heads, HEADS_BY_WIDTH, "encoder"),
              "num_classes": weight.shape[1], "learn_sigma": out_features == 2 * per_patch,
              "decoder_depth": decoder_depth, "decoder_hidden_size": width,
              "decoder_num_heads": _heads(width, decoder_num_heads, DECODER_HEADS_BY_WIDTH, "decoder"),
              "decoder_embed": "adaln"}
    return Release("maskdit", _size_name("MaskDiT", hidden, dims["depth"], dims["patch"]), kwargs, out)


def convert_release(obj: Any, layout: str | None = None, num_heads: int | None = None,
                    decoder_num_heads: int | None = None) -> Release:
    """Any loaded release file as our network's weights. `layout` 'sit' marks a DiT-layout file as
    SiT's (the weights cannot tell); 'dit' / 'maskdit' insist on that layout."""
    if layout is not None and layout not in LAYOUTS:
        raise ReleaseError(f"unknown release layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    found, sd = release_state_dict(obj)
    if layout is not None and (found == "maskdit") != (layout == "maskdit"):
        raise ReleaseError(f"asked for the {layout} layout, but the file is in the {found} layout")
    if found == "maskdit":
        return convert_maskdit(sd, num_heads, decoder_num_heads)
    return convert_dit(sd, layout or "dit", num_heads)
