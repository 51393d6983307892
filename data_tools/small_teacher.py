"""``mdt-data teacher``: train a small ViT teacher for representation alignment on small data.

At ImageNet scale the teacher is a pretrained DINOv2. The digits and MNIST have no such model, and
the held-out classifier that judges the study's samples must not be it (a generator pulled towards
the judge's own features would be graded by its coach). So their teacher is a separate small
DINOv2-architecture ViT trained to classify the *train* split only (a bundled source's held-out
split, or all of it, is refused), with random one-pixel shifts; its last layer's patch tokens are
the features. It is saved with ``save_pretrained`` so that ``mdt-data encode --features`` loads it
exactly as it loads a real DINOv2.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from .atomic import write_json_atomic
from .format import DataToolsError
from .sources import image_tensor, open_source

REPORT_NAME = "teacher.json"
BUNDLED_RESOLUTION = {"digits": 16, "mnist": 32}
"""The bundled sources and the side their demos encode at: the teacher's default resolution."""
AUTO = "auto"


def default_resolution(source: str) -> int:
    """The side a source's teacher sees by default: its demo's encoding (digits 16, MNIST 32), else 16."""
    return BUNDLED_RESOLUTION.get(source.partition(":")[0], 16)


def default_heldout(source: str) -> str | None:
    """The held-out split reported for a bundled source's train split (mnist:train -> mnist:heldout), else None."""
    name, _, split = source.partition(":")
    return f"{name}:heldout" if name in BUNDLED_RESOLUTION and split == "train" else None


def _check_source(source: str) -> None:
    """A bundled source's teacher learns from its train split only: the held-out split trains the judge."""
    name, _, split = source.partition(":")
    if name in BUNDLED_RESOLUTION and split != "train":
        raise DataToolsError(f"--source {source}: a teacher learns from the train split only (the held-out split "
                             f"trains the judge of the samples); use {name}:train")


def _images(spec: str, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, 3, R, R] and labels [N] of a source, as the encoder sees them."""
    source = open_source(spec)
    loaded = [image_tensor(source, index, resolution) for index in range(len(source))]
    return torch.stack([image for image, _, _ in loaded]), torch.tensor([label for _, label, _ in loaded])


def _shift(x: torch.Tensor, gen: torch.Generator, pixels: int = 1) -> torch.Tensor:
    """Random translations by up to `pixels` in each direction (zero padding)."""
    padded = F.pad(x, (pixels,) * 4)
    side = x.shape[-1]
    out = torch.empty_like(x)
    offsets = torch.randint(0, 2 * pixels + 1, (len(x), 2), generator=gen)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy:dy + side, dx:dx + side]
    return out


def _accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        model.eval()
        logits = torch.cat([model(pixel_values=x[i:i + 256]).logits for i in range(0, len(x), 256)])
        model.train()
    return float((logits.argmax(1) == y).float().mean())


def train_teacher(out: str, source: str = "digits:train", resolution: int | None = None, patch: int = 2, *,
                  width: int = 64, depth: int = 4, heads: int = 4, steps: int = 600, batch_size: int = 128,
                  lr: float = 1e-3, seed: int = 0, heldout: str | None = AUTO, progress: bool = True) -> dict:
    """Train the classifier and save it (transformers format, plus ``teacher.json`` with what it was
    trained on and its accuracies); returns that report. `resolution` defaults to the source's
    (`default_resolution`); `heldout` ('auto': the source's own held-out split, `default_heldout`)
    is only evaluated, never trained on."""
    _check_source(source)  # before the heavy import: a refused source is refused at once
    from transformers import Dinov2Config, Dinov2ForImageClassification  # noqa: PLC0415 - heavy

    resolution = resolution or default_resolution(source)
    heldout = default_heldout(source) if heldout == AUTO else heldout
    if resolution % patch:
        raise DataToolsError(f"--resolution {resolution} is not a multiple of --patch {patch}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = _images(source, resolution)
    num_labels = int(labels.max()) + 1
    config = Dinov2Config(image_size=resolution, patch_size=patch, hidden_size=width, num_hidden_layers=depth,
                          num_attention_heads=heads, mlp_ratio=4, num_labels=num_labels)
    model = Dinov2ForImageClassification(config)
    x = images.float().div(255).sub(0.5).div(0.5)  # the preprocessor config written below: mean = std = 0.5
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    start = time.monotonic()
    for step in range(1, steps + 1):
        pick = torch.randint(0, len(x), (batch_size,), generator=gen)
        loss = F.cross_entropy(model(pixel_values=_shift(x[pick], gen)).logits, labels[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress and (step % 100 == 0 or step == steps):
            print(f"[teacher] step {step}/{steps} loss {loss.item():.4f} ({time.monotonic() - start:.0f}s)",
                  file=sys.stderr, flush=True)
    report = dict(source=source, resolution=resolution, steps=steps, seed=seed, images=len(x),
                  train_accuracy=_accuracy(model, x, labels), architecture="Dinov2",
                  width=width, depth=depth, heads=heads, patch=patch)
    if heldout:
        hx, hy = _images(heldout, resolution)
        report.update(heldout=heldout, heldout_accuracy=_accuracy(model, hx.float().div(255).sub(0.5).div(0.5), hy))
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    with open(os.path.join(out, "preprocessor_config.json"), "w", encoding="utf-8") as handle:
        json.dump({"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": {"height": resolution,
                                                                             "width": resolution}}, handle)
    write_json_atomic(os.path.join(out, REPORT_NAME), report)
    if progress:
        held = f", held-out accuracy {report['heldout_accuracy']:.1%}" if heldout else ""
        print(f"[teacher] saved {out}: train accuracy {report['train_accuracy']:.1%}{held}", file=sys.stderr)
    return report

