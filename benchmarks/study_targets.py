"""When does one study variant reach another's final quality, as a share of the other's budget?

    python benchmarks/study_targets.py runs/studies/digits mask_align --against mask_final dit_edm

For each reference variant: the target is the reference's final mean quality (mean over its
seeds); the variant's mean curve is interpolated linearly between evaluations (the study's own
rule, trainer.study.summary.first_reach); the table gives the images, training FLOPs
and training seconds spent at that point and each as a fraction of the reference's budget.
Issue #16 asks whether masked training with alignment reaches mask_final's final quality in <= 50%
of its compute and the DiT baseline's in <= 30%.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import List

from trainer.evaluation.history import read_metrics
from trainer.evaluation.registry import direction
from trainer.study.summary import first_reach, mean_curve


def curve(root: str, variant: str, quality: str) -> List[dict]:
    """The mean curve over every finished seed of a variant (VARIANT-sN run directories)."""
    runs = [read_metrics(d) for d in sorted(glob.glob(os.path.join(root, f"{variant}-s*")))]
    if not runs:
        raise SystemExit(f"study_targets: no runs of {variant!r} under {root}")
    points = mean_curve(runs, quality)
    if not points:
        raise SystemExit(f"study_targets: {variant!r} has an unfinished run (no final {quality} evaluation)")
    return points


def main(argv: List[str] | None = None) -> int:
    """Print the table; exit 0."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", help="the study's output_dir")
    p.add_argument("variant")
    p.add_argument("--against", nargs="+", required=True, help="reference variants")
    p.add_argument("--quality", default="digits_fd")
    args = p.parse_args(argv)
    mine = curve(args.root, args.variant, args.quality)
    way = direction(args.quality)
    print(f"| {args.variant} reaching | target ({args.quality}) | at step | images | FLOPs | seconds |"
          " images / ref | FLOPs / ref | seconds / ref |")
    print("|---|---|---|---|---|---|---|---|---|")
    for ref_name in args.against:
        ref = curve(args.root, ref_name, args.quality)[-1]
        hit = first_reach(mine, ref["quality"], way)
        if hit is None:
            print(f"| {ref_name} final | {ref['quality']:.2f} | not reached | | | | | | |")
            continue
        share = {axis: hit[axis] / ref[axis] for axis in ("images_seen", "train_flops", "train_seconds")}
        print(f"| {ref_name} final | {ref['quality']:.2f} | {hit['step']:.0f} | {hit['images_seen'] / 1e3:.1f}k "
              f"| {hit['train_flops']:.3g} | {hit['train_seconds']:.0f} | {share['images_seen']:.2f} "
              f"| {share['train_flops']:.2f} | {share['train_seconds']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
