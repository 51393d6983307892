"""How far stock diffusers is from our DiT after `mdt-export --format diffusers`, in samples.

diffusers' DiT embeds timesteps with frequencies exp(-ln(1e4) k / (half - 1)); ours (and the DiT
release's) with exp(-ln(1e4) k / half). This script samples a trained vp_eps DiT of ours three ways
with the same noise and labels, through diffusers' DDIMScheduler (the loop DiTPipeline runs, without
its VAE: the digits model works on pixels):

  stock   DiTTransformer2DModel.from_pretrained(DIR) as diffusers ships it
  fixed   the same with each block's time_proj.downscale_freq_shift set to 0
  ours    our network itself in the same loop (the reference: `fixed` must equal it)

and prints the mean absolute pixel difference to `ours` and the held-out digits classifier's
accuracy for each (docs/releases.md has the numbers):

    python benchmarks/diffusers_gap.py runs/NAME/checkpoints/step00001500 [--steps 50] [--n 500]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.checkpoints import read_network  # noqa: E402
from trainer.checkpoints.diffusers_export import export_diffusers  # noqa: E402
from trainer.evaluation.digits import accuracy  # noqa: E402
from trainer.sample.loading import load_model  # noqa: E402


@torch.no_grad()
def ddim(model, scheduler: DDIMScheduler, noise: torch.Tensor, labels: torch.Tensor, steps: int,
         scale: float, null: int) -> torch.Tensor:
    """DiTPipeline's loop (guidance on every channel, learned-sigma channels dropped)."""
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    channels = x.shape[1]
    for t in scheduler.timesteps:
        xin = torch.cat([x, x]) if scale > 1 else x
        y = torch.cat([labels, torch.full_like(labels, null)]) if scale > 1 else labels
        out = model(xin, t.expand(len(xin)), y)[:, :channels]
        if scale > 1:
            cond, uncond = out.chunk(2)
            out = uncond + scale * (cond - uncond)
        x = scheduler.step(out, t, x).prev_sample
    return x


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--n", type=int, default=500, help="images (50 per class)")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0])
    args = p.parse_args()
    src = read_network(args.checkpoint)
    ours = load_model(args.checkpoint).denoiser.net.eval()
    out_dir = tempfile.mkdtemp(prefix="diffusers_gap_")
    export_diffusers(src, out_dir)
    stock = DiTTransformer2DModel.from_pretrained(out_dir).eval()
    fixed = DiTTransformer2DModel.from_pretrained(out_dir).eval()
    for block in fixed.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    scheduler = DDIMScheduler.from_pretrained(out_dir)
    num_classes = src.model_kwargs["num_classes"]
    labels = torch.arange(args.n) % num_classes
    shape = src.dataset["latent_shape"]
    noise = torch.randn(args.n, *shape, generator=torch.Generator().manual_seed(0))
    nets = {"stock": lambda x, t, y: stock(x, timestep=t, class_labels=y).sample,
            "fixed": lambda x, t, y: fixed(x, timestep=t, class_labels=y).sample,
            "ours": lambda x, t, y: ours(x, t, y).sample}
    print(f"{src.model_name} from {args.checkpoint}: DDIM {args.steps} steps, {args.n} images, same noise")
    print("| guidance | model | mean abs pixel diff to ours (0-255) | digits accuracy |")
    print("|---|---|---|---|")
    for scale in args.guidance:
        images = {}
        for name, net in nets.items():
            images[name] = to_uint8(ddim(net, scheduler, noise, labels, args.steps, scale, num_classes))
        for name in ("stock", "fixed", "ours"):
            diff = np.abs(images[name].astype(int) - images["ours"].astype(int)).mean()
            acc = accuracy(images[name], labels.numpy())
            print(f"| {scale:g} | {name} | {diff:.3f} | {acc:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
