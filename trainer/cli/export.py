"""mdt-export, mdt-convert, mdt-universal: checkpoints and published releases as files for
sampling, init_from, diffusers or another number of ranks."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..checkpoints import COMPLETE, WEIGHT_KINDS, CheckpointError, export_weights, is_complete, to_universal
from .common import OneLineParser, release_options


def export_main(argv: list[str] | None = None) -> int:
    """mdt-export: the EMA (default) or live weights of a checkpoint as one safetensors file, or
    (--format diffusers) anything mdt-sample reads as a diffusers DiT folder."""
    p = OneLineParser(prog="mdt-export", description=export_main.__doc__)
    p.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/NAME/checkpoints/step00010000 (with "
                                      "--format diffusers also an export or a release file)")
    p.add_argument("--out", required=True, help="output .safetensors path, or the folder for --format diffusers")
    p.add_argument("--which", choices=WEIGHT_KINDS, default=None,
                   help="ema (default) or model: which weights of a checkpoint (an export holds one kind)")
    p.add_argument("--format", choices=("safetensors", "diffusers"), default="safetensors",
                   help="safetensors: our file for mdt-sample / init_from; diffusers: a DiTTransformer2DModel folder "
                        "with a scheduler config")
    release_options(p)
    args = p.parse_args(argv)
    if args.format == "diffusers":
        return _export_diffusers(args)
    if not is_complete(args.checkpoint):
        print(f"mdt-export: error: {args.checkpoint} is not a complete checkpoint (no {COMPLETE} file)",
              file=sys.stderr)
        return 2
    try:
        meta = export_weights(args.checkpoint, args.out, args.which or "ema")
    except CheckpointError as err:
        print(f"mdt-export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({meta['weights']} weights of {meta['model']} at step {meta['step']})")
    return 0


def _export_diffusers(args: argparse.Namespace) -> int:
    from ..checkpoints import read_network  # noqa: PLC0415
    from ..checkpoints.diffusers_export import export_diffusers  # noqa: PLC0415

    try:
        src = read_network(args.checkpoint, args.which, args.layout, args.num_heads, args.decoder_num_heads)
        export_diffusers(src, args.out)
    except CheckpointError as err:
        print(f"mdt-export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: DiTTransformer2DModel.from_pretrained({args.out!r}) and its scheduler config "
          f"({src.kind} {src.model_name}); see docs/releases.md for the timestep-embedding difference")
    return 0


def convert_main(argv: list[str] | None = None) -> int:
    """mdt-convert: a published DiT, SiT or MaskDiT checkpoint (or anything mdt-sample reads) as an
    mdt-export safetensors file, which mdt-sample, mdt-export and model.init_from take."""
    from ..checkpoints import read_network, write_export  # noqa: PLC0415

    p = OneLineParser(prog="mdt-convert", description=convert_main.__doc__)
    p.add_argument("source", help="e.g. DiT-XL-2-256x256.pt, a MaskDiT release .pt, a checkpoint directory")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--weights", choices=WEIGHT_KINDS, default=None,
                   help="ema (default) or model (a checkpoint's live weights)")
    release_options(p)
    args = p.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        p.error(f"--out must end in .safetensors, got {args.out}")
    try:
        src = read_network(args.source, args.weights, args.layout, args.num_heads, args.decoder_num_heads)
        write_export(args.out, src.state_dict, src.model_name, src.model_kwargs, src.diffusion, src.dataset,
                     src.step, src.weights, source=f"{src.kind}:{os.path.abspath(src.path)}")
    except CheckpointError as err:
        print(f"mdt-convert: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {src.kind} {src.model_name} {json.dumps(src.model_kwargs)}")
    return 0


def universal_main(argv: list[str] | None = None) -> int:
    """mdt-universal: convert a ZeRO checkpoint so that training resumes from it on any number of ranks."""
    p = OneLineParser(prog="mdt-universal", description=universal_main.__doc__)
    p.add_argument("checkpoint", help="a complete checkpoint directory, e.g. runs/NAME/checkpoints/step00010000")
    p.add_argument("--out", default=None,
                   help="output directory (default: CHECKPOINT_universal, where the training command finds it "
                        "when the number of ranks changed; elsewhere, pass --set checkpoint.resume=OUT)")
    p.add_argument("--workers", type=int, default=1, help="processes DeepSpeed uses to extract and merge shards")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    try:
        out = to_universal(args.checkpoint, args.out, args.workers)
    except CheckpointError as err:
        print(f"mdt-universal: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}: rerun the training command with the new number of ranks to resume from it")
    return 0
