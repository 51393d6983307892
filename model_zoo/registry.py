"""Model registry: a plain dict from names such as "MaskDiT-XL/2" to a spec that builds the network.

The names double as CLI / config choices. Sizes follow the DiT paper (S, B, L, XL) plus H
(ViT-H widths); patch sizes 2, 4, 8. Families: DiT (dense), MaskDiT, and the token-sparse DiTs
SPRINT and TREAD, named METHOD-SIZE/PATCH like MaskDiT with the method as its paper spells it (the
backbone is DiT's in all of them; SPRINT's release is SiT-based, TREAD's DiT-based).
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Set

from torch import nn

from .dit import DiT
from .maskdit import MaskDiT
from .sprint import SprintDiT
from .tread import TreadDiT

SIZES: Dict[str, Dict[str, int]] = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    "H": dict(depth=32, hidden_size=1280, num_heads=16),
}

# MaskDiT's published decoder (8 x 512) costs ~14 GFLOPs whatever the encoder, ~11% of the masked
# XL/2 forward. Smaller sizes get narrower / shallower decoders so the decoder stays about that
# share (8 x 512 would cost more than a whole S/2 encoder). Shares are checked in tests.
DECODERS: Dict[str, Dict[str, int]] = {
    "S": dict(decoder_depth=2, decoder_hidden_size=192, decoder_num_heads=3),
    "B": dict(decoder_depth=4, decoder_hidden_size=256, decoder_num_heads=4),
    "L": dict(decoder_depth=8, decoder_hidden_size=384, decoder_num_heads=6),
    "XL": dict(decoder_depth=8, decoder_hidden_size=512, decoder_num_heads=16),
    "H": dict(decoder_depth=8, decoder_hidden_size=576, decoder_num_heads=9),
}

PATCH_SIZES = (2, 4, 8)


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: the network class and its default constructor arguments."""

    name: str
    cls: Callable[..., nn.Module]
    defaults: Dict[str, Any] = field(default_factory=dict)

    @property
    def can_mask(self) -> bool:
        """Whether the network drops tokens in training (mask_ratio > 0): the class's `can_mask`
        (MaskDiT, SPRINT, TREAD)."""
        return bool(getattr(self.cls, "can_mask", False))

    @property
    def family(self) -> str:
        """What the network does with tokens: 'dense', 'maskdit', 'sprint' or 'tread'."""
        return str(getattr(self.cls, "family", "dense"))

    def options(self) -> Set[str]:
        """Constructor keywords the network accepts: those of its class and of every DiT class it
        derives from (each family adds its own)."""
        valid: Set[str] = set()
        for klass in inspect.getmro(self.cls) if isinstance(self.cls, type) else ():
            if issubclass(klass, DiT):
                valid |= set(inspect.signature(klass.__init__).parameters) - {"self", "args", "kwargs"}
        return valid

    def build(self, **overrides: Any) -> nn.Module:
        """Construct the network; overrides replace defaults, unknown keys are named in the error."""
        valid = self.options()
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r} for model {self.name}; valid: {sorted(valid)}")
        return self.cls(**{**self.defaults, **overrides})


def _make_registry() -> Dict[str, ModelSpec]:
    registry: Dict[str, ModelSpec] = {}
    for size, dims in SIZES.items():
        for patch in PATCH_SIZES:
            registry[f"DiT-{size}/{patch}"] = ModelSpec(f"DiT-{size}/{patch}", DiT, {**dims, "patch_size": patch})
            registry[f"MaskDiT-{size}/{patch}"] = ModelSpec(
                f"MaskDiT-{size}/{patch}", MaskDiT, {**dims, **DECODERS[size], "patch_size": patch}
            )
            # layouts (dense_in / dense_out, route_start / route_end) default from the depth
            for family, cls in (("SPRINT", SprintDiT), ("TREAD", TreadDiT)):
                name = f"{family}-{size}/{patch}"
                registry[name] = ModelSpec(name, cls, {**dims, "patch_size": patch})
    return registry


MODELS: Dict[str, ModelSpec] = _make_registry()


def build_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registry model by name, e.g. build_model("MaskDiT-XL/2", num_classes=1000)."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; choose from {', '.join(MODELS)}"
        raise ValueError(f"unknown model {name!r}{hint}")
    return MODELS[name].build(**overrides)
